"""The prompts file of sample images: one prompt per line, read and checked before JAX is imported.

Blank lines and lines starting with `#` are skipped. A line may end with ` --n NEGATIVE`, its negative prompt
(kohya's prompt-file spelling); kohya's other per-line options (--w, --h, --d, --l, --s ...) are refused by
name, since the run's sample settings apply to every line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from jaxlora.train.config import SettingsError

_OPTION = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")


@dataclass(frozen=True)
class SamplePrompt:
    text: str
    negative: str = ""


def parse_prompt_line(line: str, where: str) -> SamplePrompt:
    """One line's prompt and negative prompt; `where` (file:line) names it in errors."""
    options = _OPTION.findall(line)
    unknown = [name for name in options if name != "n"]
    if unknown:
        raise SettingsError(
            "sample_prompts",
            f"{where}: per-line option --{unknown[0]} is not supported (only --n NEGATIVE); the sample_* settings "
            "apply to every prompt",
        )
    if options.count("n") > 1:
        raise SettingsError("sample_prompts", f"{where}: --n given more than once")
    text, *negative = re.split(r"(?:^|\s)--n(?=\s|$)", line)
    text, negative = text.strip(), "".join(negative).strip()
    if not text:
        raise SettingsError("sample_prompts", f"{where}: the line has a negative prompt but no prompt")
    return SamplePrompt(text, negative)


def read_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """The prompts of a prompts file, in order; SettingsError naming the file (and line) when it cannot be used."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SettingsError("sample_prompts", f"sample_prompts {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError("sample_prompts", f"sample_prompts {path}: cannot read it as text ({error})") from None
    prompts = [
        parse_prompt_line(line, f"{path}:{number}")
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise SettingsError("sample_prompts", f"sample_prompts {path} holds no prompts (one per line)")
    return prompts
