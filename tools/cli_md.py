"""Write docs/cli.md, the reference of every `charlstm` command and option, from the click commands.

    python tools/cli_md.py           # rewrite docs/cli.md
    python tools/cli_md.py --check   # exit 1 if docs/cli.md differs from what the commands say

The page is generated so that it cannot drift from the CLI: tests/test_cli.py fails when the
committed page differs from `render()`. The configuration flags, shared by `train`, `tune` and
`compare`, are listed once, by TOML table, after the commands.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

from charlstm.cli import ConfigOption, main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli.md"

HEADER = """\
# CLI reference

Every command and option of `charlstm`, with what it does, its choices and its default (the same
text as `charlstm COMMAND --help`). This page is generated from the commands by
`python tools/cli_md.py`; edit the help in `src/charlstm/cli.py` (or a field's description in
`src/charlstm/config.py`) and run it again rather than editing this page.

Every command also takes `-h`/`--help`. How the parts fit together is in the
[user guide](guide.md); errors and exit codes are in [errors.md](errors.md).
"""

SECTION_TITLES = {
    "data": "where the text comes from and how it is batched",
    "model": "the network",
    "optim": "Adam, clipping and the learning-rate schedule",
    "train": "budgets, evaluation, hardware and transfer",
}


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _names(param: click.Option) -> str:
    names = ", ".join(f"`{o}`" for o in param.opts)
    if param.secondary_opts:
        names += " / " + ", ".join(f"`{o}`" for o in param.secondary_opts)
    return names


def _value(param: click.Option, ctx: click.Context) -> str:
    if param.is_flag:
        return ""
    if isinstance(param.type, click.Choice):
        return ", ".join(f"`{c}`" for c in param.type.choices)
    return param.make_metavar(ctx)


def _default(param: click.Option, ctx: click.Context) -> str:
    extra = param.get_help_extra(ctx)
    if param.required:
        return "required"
    default = extra.get("default", "")
    if default and not default.strip():
        return f'`"{default}"`'  # a blank default, quoted so that it shows
    return f"`{default}`" if default else ""


def _table(params: list[click.Option], ctx: click.Context) -> list[str]:
    rows = ["| option | value | what it does | default |", "|---|---|---|---|"]
    for p in params:
        rows.append(
            f"| {_names(p)} | {_cell(_value(p, ctx))} | {_cell(p.help or '')} | "
            f"{_cell(_default(p, ctx))} |"
        )
    return rows


def _commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    """(full name, command) of every command in definition order, subcommands after their group."""
    out = []
    for name, command in group.commands.items():
        full = f"{prefix} {name}"
        out.append((full, command))
        if isinstance(command, click.Group):
            out += _commands(command, full)
    return out


def _command(full: str, command: click.Command, config_rows: dict[str, click.Option]) -> list[str]:
    ctx = click.Context(command, info_name=full)
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"## {full}", "", f"    {full} {usage}", "", inspect.cleandoc(command.help or ""), ""]
    if isinstance(command, click.Group):
        subs = [f"[`{full} {n}`](#{full.replace(' ', '-')}-{n})" for n in command.commands]
        return [*lines, f"Commands: {', '.join(subs)}.", ""]
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    options = [p for p in command.params if isinstance(p, click.Option)]
    own = [p for p in options if not isinstance(p, ConfigOption)]
    config = [p for p in options if isinstance(p, ConfigOption)]
    if arguments:
        names = [
            f"`{a.make_metavar(ctx)}`" + ("" if a.required else " (optional)") for a in arguments
        ]
        lines += [f"Arguments: {', '.join(names)}.", ""]
    lines += [*_table(own, ctx), ""]
    if config:
        lines.append(
            "Every [configuration flag](#configuration-flags) is an option of this command too."
        )
        changed = [
            f"`{p.opts[0]}` {_default(p, ctx)}"
            for p in config
            if _default(p, ctx) != _default(config_rows[p.name], ctx)
        ]
        if changed:
            lines.append(f"Defaults that differ here: {', '.join(changed)}.")
        lines.append("")
    return lines


def render() -> str:
    """The whole page, as the commands define it now."""
    commands = _commands(main, "charlstm")
    train = dict(commands)["charlstm train"]
    config_rows = {p.name: p for p in train.params if isinstance(p, ConfigOption)}
    lines = [HEADER]
    lines += ["| command | what it does |", "|---|---|"]
    for full, command in commands:
        anchor = full.replace(" ", "-")
        lines.append(f"| [`{full}`](#{anchor}) | {_cell(command.get_short_help_str(limit=200))} |")
    lines.append("")
    for full, command in commands:
        lines += _command(full, command, config_rows)
    ctx = click.Context(train, info_name="charlstm train")
    lines += [
        "## Configuration flags",
        "",
        "Each flag sets one field of the run's configuration, and each is also a key of a TOML",
        "preset given with `--config`, flat (`hidden_size = 256`) or in its table",
        "(`[model]` then `hidden_size = 256`); flags override the preset. An unknown key is an",
        "error that suggests the closest one.",
        "",
    ]
    for section, title in SECTION_TITLES.items():
        params = [p for p in config_rows.values() if p.section == section]
        lines += [f"### [{section}]: {title}", ""] + _table(params, ctx) + [""]
    return "\n".join(lines).rstrip() + "\n"


def main_(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date; run: python tools/cli_md.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main_(sys.argv[1:]))
