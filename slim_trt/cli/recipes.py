"""Help text about recipes, read from slim_trt.config: the defaults, the presets, describe() and what each preset
measured. `compress --help`, `demo`, `info` and `slim-trt --help` say what the code runs because they print it from
the same tables the commands compress with, so the prose cannot drift from a default again."""
from __future__ import annotations

import shutil
import textwrap

from ..config import DEFAULT_PRESET, DEFAULT_REASON, PRESETS, CompressConfig, describe, measured, recipe_label


def default_recipe() -> CompressConfig:
    """What `slim-trt compress` without --preset or recipe flags runs, and the demo: the defaults' preset
    (equal to CompressConfig(), tests/test_config.py)."""
    return CompressConfig(**PRESETS[DEFAULT_PRESET])


def default_line() -> str:
    """'--preset trt-int8-sparse (W8A8 2:4)', the name and math of the default recipe."""
    return f"--preset {DEFAULT_PRESET} ({recipe_label(default_recipe())})"


def presets_paragraphs() -> list[str]:
    """One paragraph for the defaults (what, measured, why), then one per other preset."""
    d = default_recipe()
    out = [f"The defaults are {default_line()}: {describe(d)}; {measured(DEFAULT_PRESET)}. Why: {DEFAULT_REASON}."]
    for name, kw in PRESETS.items():
        if name != DEFAULT_PRESET:
            c = CompressConfig(**kw)
            out.append(f"--preset {name} ({recipe_label(c)}): {describe(c)}; {measured(name)}.")
    return out


def spell(value, none: str = "none") -> str:
    """A value as the CLI takes it: None -> 'none' (or `none`), booleans on/off, floats without trailing zeros."""
    if value is None:
        return none
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_text(field: str, notes: dict | None = None, none: str = "none", then: str = "") -> str:
    """'[default: 8; 4 in --preset slim-paper, slim-2to4 and int4-dense]' for a CompressConfig field: its value in
    the default recipe, then each other value a preset holds and which presets hold it. `notes` explains a value
    wherever it shows (keyed by the value, so a note follows its value if the defaults change); `then` adds a rule."""
    notes = notes or {}

    def word(v) -> str:
        note = next((n for k, n in notes.items() if type(k) is type(v) and k == v), None)
        return f"{spell(v, none)} ({note})" if note else spell(v, none)

    base = getattr(default_recipe(), field)
    others: list[tuple[object, list[str]]] = []
    for name, kw in PRESETS.items():
        v = getattr(CompressConfig(**kw), field)
        if name == DEFAULT_PRESET or v == base:
            continue
        slot = next((names for value, names in others if type(value) is type(v) and value == v), None)
        if slot is None:
            others.append((v, [name]))
        else:
            slot.append(name)
    parts = [word(base)] + [f"{word(v)} in --preset {and_list(names)}" for v, names in others] + ([then] if then else [])
    return f"[default: {'; '.join(parts)}]"


def and_list(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def fill(*paragraphs: str) -> str:
    """Paragraphs wrapped to the terminal as argparse wraps help (descriptions are printed raw, for the examples),
    never inside a hyphenated word or a flag."""
    width = max(shutil.get_terminal_size().columns - 2, 40)
    return "\n".join(textwrap.fill(p, width, break_on_hyphens=False, break_long_words=False) for p in paragraphs)
