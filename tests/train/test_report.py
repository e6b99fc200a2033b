import json
import math

import numpy as np
import pytest
from PIL import Image

from jaxlora.adapters.metadata import parse_steps_from_name
from jaxlora.train.loss_plot import loss_curves, nice_ticks, plot_area, render_loss_plot, smoothing_window
from jaxlora.train.report import output_stem, write_loss_history

PLOT_AREA = (77, 49, 816, 462)  # inside the axes' frame: x0, y0, x1, y1 (exclusive)


def touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def plot_pixels(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (840, 520)
        return np.asarray(image.convert("RGB").crop(PLOT_AREA), dtype=int)


def test_first_stem_in_an_empty_or_missing_folder_has_counter_1(tmp_path):
    assert output_stem(tmp_path, "run", 16) == tmp_path / "run_16_steps_00001_"
    assert output_stem(tmp_path, "run", None) == tmp_path / "run_00001_"


def test_counter_counts_files_not_the_steps_in_their_names(tmp_path):
    # ComfyUI reads the 16 as the counter here and jumps to 17
    touch(tmp_path, "x_16_steps_00001_.safetensors")
    assert output_stem(tmp_path, "x", 16).name == "x_16_steps_00002_"
    touch(tmp_path, "x_00004_.safetensors", "x_8_steps_00003_loss.png")
    assert output_stem(tmp_path, "x", 32).name == "x_32_steps_00005_"


def test_files_of_other_base_names_do_not_raise_the_counter(tmp_path):
    touch(tmp_path, "x_lora_16_steps_00009_.safetensors", "y_00007_.safetensors", "xx_00005_.safetensors", "x.txt")
    assert output_stem(tmp_path, "x", 16).name == "x_16_steps_00001_"


def test_prefix_subfolders_choose_the_folder_and_count_there_only(tmp_path):
    touch(tmp_path, "my_lora_4_steps_00003_.safetensors")
    touch(tmp_path / "loras", "my_lora_4_steps_00001_.safetensors")
    assert output_stem(tmp_path, "loras/my_lora", 4) == tmp_path / "loras" / "my_lora_4_steps_00002_"
    assert output_stem(tmp_path, "a/b/my_lora", 4) == tmp_path / "a" / "b" / "my_lora_4_steps_00001_"


@pytest.mark.parametrize("prefix", ["../escape", "loras/", ""])
def test_prefix_outside_the_output_folder_or_without_a_name_is_refused(tmp_path, prefix):
    with pytest.raises(ValueError, match="must name a file inside"):
        output_stem(tmp_path / "out", prefix, 1)


@pytest.mark.parametrize(
    ("filename", "steps"),
    [
        ("ComfyUI_trained_lora_16_steps_00001_.safetensors", 16),
        ("loras/run_200_steps_00003_.safetensors", 200),
        ("a_3_steps_b_5_steps_00001_.safetensors", 3),  # the first `_steps_` decides, as in ComfyUI
        ("my_lora.safetensors", None),
        ("my_lora_steps_00001_.safetensors", None),
        ("run_１６_steps_00001_.safetensors", None),  # non-ASCII digits are not a step count
    ],
)
def test_parse_steps_from_name_reads_the_token_before_the_first_steps(filename, steps):
    assert parse_steps_from_name(filename) == steps


def test_loss_history_json_and_csv_contents(tmp_path):
    paths = write_loss_history(tmp_path / "run_2_steps_00001_", [0.5, 0.25, 0.125, 0.1], steps_per_optimizer_step=2)
    assert {name: path.name for name, path in paths.items()} == {
        "loss json": "run_2_steps_00001_loss.json",
        "loss csv": "run_2_steps_00001_loss.csv",
        "loss plot": "run_2_steps_00001_loss.png",
    }
    assert paths["loss json"].read_text() == '{"loss": [0.5, 0.25, 0.125, 0.1], "micro_steps_per_step": 2}\n'
    assert paths["loss csv"].read_text() == "micro_step,step,loss\n1,1,0.5\n2,1,0.25\n3,2,0.125\n4,2,0.1\n"


def test_validation_history_goes_into_the_json_and_its_own_csv(tmp_path):
    validation = {"step": [2, 4], "loss": [0.5, 0.25], "ema_loss": [0.75, math.nan]}
    paths = write_loss_history(tmp_path / "run_", [0.5, 0.25, 0.125, 0.1], 1, validation)
    assert json.loads(paths["loss json"].read_text())["validation"] == {
        "step": [2, 4],
        "loss": [0.5, 0.25],
        "ema_loss": [0.75, None],
    }
    assert paths["validation csv"].name == "run_validation_loss.csv"
    assert paths["validation csv"].read_text() == "step,loss,ema_loss\n2,0.5,0.75\n4,0.25,nan\n"


def test_moving_mean_is_the_centred_mean_of_its_window():
    rng = np.random.default_rng(0)
    values = 1 + rng.random(400)
    values[17] = math.nan
    curves = loss_curves(values, 2)
    assert curves.window == 20  # 1/20 of the run
    np.testing.assert_array_equal(curves.x[:3], [0.5, 1.0, 1.5])  # micro-steps in optimizer steps
    for i in (0, 5, 17, 200, 399):  # an edge, a window holding the NaN, the middle, the other edge
        window = values[max(i - 10, 0) : i + 10]
        np.testing.assert_allclose(curves.mean[i], np.nanmean(window), rtol=1e-12)
    assert smoothing_window(9) == 1 and smoothing_window(10) == 5 and smoothing_window(2000) == 100


def test_nice_ticks_are_round_and_inside_the_range():
    np.testing.assert_allclose(nice_ticks(0.0, 1.0, 5), [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(nice_ticks(0.13, 0.61, 6), [0.2, 0.3, 0.4, 0.5, 0.6])
    np.testing.assert_array_equal(nice_ticks(0, 3, 8, integer=True), [0, 1, 2, 3])  # steps: whole numbers
    np.testing.assert_array_equal(nice_ticks(0, 1000, 8, integer=True), np.arange(0, 1001, 200))  # 125 rounds up


def test_plot_draws_points_mean_and_validation_where_its_axes_place_them():
    """The dark mean line, the orange validation circles and the green EMA squares are where `PlotArea` maps
    their values; a spike at the start of a long run is left above the y range (the mean carries it)."""
    rng = np.random.default_rng(1)
    losses = 0.2 + 0.3 * np.exp(-np.arange(400) / 80) + 0.05 * rng.random(400)
    losses[0] = 50.0
    validation = {"step": [100, 200, 300, 400], "loss": [0.45, 0.3, 0.26, 0.24], "ema_loss": [0.5, 0.35, 0.3, 0.25]}
    rgb = np.asarray(render_loss_plot(list(losses), 1, "run", validation), dtype=int)
    assert rgb.shape == (520, 840, 3)
    curves = loss_curves(losses, 1, validation)
    area = plot_area(curves, 400)
    assert area.y_range[1] < 1.0  # not stretched to the spike of 50

    def colour_near(x, y, colour, reach=2):
        x, y = round(float(x)), round(float(y))
        patch = rgb[y - reach : y + reach + 1, x - reach : x + reach + 1]
        return (np.abs(patch - np.asarray(colour)).max(axis=-1) < 40).any()

    for k in (60, 150, 250, 350):
        assert colour_near(area.to_x(curves.x[k]), area.to_y(curves.mean[k]), (31, 74, 150)), k
    for step, loss, ema in zip(*validation.values(), strict=True):
        assert colour_near(area.to_x(step - 2), area.to_y(loss), (225, 120, 20)), step
        assert colour_near(area.to_x(step - 2), area.to_y(ema), (30, 140, 70)), step


def test_long_histories_get_a_moving_mean_over_the_raw_points():
    rng = np.random.default_rng(0)
    pixels = np.asarray(render_loss_plot(list(1 + rng.random(2000)), 1), dtype=int)[48:462, 76:816]
    assert (pixels.max(axis=-1) < 160).sum() > 800  # a 2 px line across 740 px


def test_non_finite_losses_are_null_in_json_kept_in_csv_and_skipped_in_the_plot(tmp_path):
    losses = [0.5, math.nan, 0.25, math.inf, -math.inf, 0.125]
    paths = write_loss_history(tmp_path / "run_", losses, 1)
    assert json.loads(paths["loss json"].read_text())["loss"] == [0.5, None, 0.25, None, None, 0.125]
    rows = paths["loss csv"].read_text().splitlines()[1:]
    assert rows == ["1,1,0.5", "2,2,nan", "3,3,0.25", "4,4,inf", "5,5,-inf", "6,6,0.125"]
    assert (plot_pixels(paths["loss plot"]).max(axis=-1) < 160).any()


def test_all_non_finite_or_empty_histories_still_write_every_file(tmp_path):
    for name, losses in [("empty_", []), ("nan_", [math.nan, math.nan])]:
        paths = write_loss_history(tmp_path / name, losses, 4)
        assert json.loads(paths["loss json"].read_text()) == {"loss": [None] * len(losses), "micro_steps_per_step": 4}
        assert paths["loss csv"].read_text().splitlines()[0] == "micro_step,step,loss"
        plot_pixels(paths["loss plot"])


def test_a_constant_or_single_loss_plots_without_dividing_by_zero(tmp_path):
    for name, losses in [("flat_", [0.3] * 5), ("one_", [0.3])]:
        assert (plot_pixels(write_loss_history(tmp_path / name, losses, 1)["loss plot"]).max(axis=-1) < 160).any()


def test_existing_files_are_never_overwritten_and_nothing_is_half_written(tmp_path):
    (tmp_path / "run_loss.csv").write_text("keep")
    with pytest.raises(FileExistsError, match="run_loss.csv"):
        write_loss_history(tmp_path / "run_", [0.5], 1)
    assert (tmp_path / "run_loss.csv").read_text() == "keep"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run_loss.csv"]


def test_a_second_run_gets_a_new_stem_so_its_history_does_not_collide(tmp_path):
    first = output_stem(tmp_path, "loras/run", 4)
    write_loss_history(first, [0.5], 1)
    second = output_stem(tmp_path, "loras/run", 4)
    assert second.name == "run_4_steps_00002_"
    write_loss_history(second, [0.5], 1)
