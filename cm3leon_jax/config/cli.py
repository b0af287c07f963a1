"""`cm3leon config show|keys`, and the `--config FILE [section.key=value ...]` arguments every
stage's command takes.

    cm3leon config show --config FILE [section.key=value ...]   the resolved config as YAML
    cm3leon config keys [SECTION] [--markdown]                  every key: type, default, meaning

`show` prints YAML that loads back to the same config; `keys` is generated from the section
dataclasses (their field comments), so it cannot drift from the code (docs/config.md is its
`--markdown` output).
"""

from __future__ import annotations

import argparse
import dataclasses

from cm3leon_jax.config import Config, ConfigError, load_config
from cm3leon_jax.config.loader import dump_yaml, field_docs, format_default, keys


def with_config(p: argparse.ArgumentParser, required: bool = True) -> argparse.ArgumentParser:
    """Add `--config FILE` and the `section.key=value` overrides to a command's parser."""
    p.add_argument("--config", required=required,
                   help="YAML config file (configs/*.yaml; a shipped config by its name, "
                        "e.g. configs/tiny.yaml, works from any directory)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. train.steps=50 mesh.fsdp=2 "
                        "(`cm3leon config keys` lists them)")
    return p


def add_commands(sub) -> None:
    p = sub.add_parser("config", help="show the resolved config; list every key")
    actions = p.add_subparsers(dest="action", required=True)
    show = with_config(actions.add_parser(
        "show", help="the resolved config (file + overrides, checked) as YAML"))
    show.add_argument("--devices", type=int, default=None,
                      help="also check the mesh and batch against N devices")
    show.set_defaults(fn=show_config)
    k = actions.add_parser("keys", help="every config key with its type, default and meaning")
    k.add_argument("section", nargs="?", help="one section (e.g. model); default: all")
    k.add_argument("--markdown", action="store_true", help="as the tables of docs/config.md")
    k.set_defaults(fn=list_keys)


def show_config(args) -> None:
    print(dump_yaml(load_config(args.config, args.overrides, num_devices=args.devices)), end="")


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def key_table(section: str | None = None, markdown: bool = False) -> str:
    """Every key of `section` (or of all sections), one line each."""
    names = [section] if section else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ConfigError(f"config keys: no section {unknown[0]!r} (sections: "
                          f"{', '.join(SECTIONS)})")
    docs = field_docs(Config)
    out = []
    for name in names:
        rows = keys(type(getattr(Config(), name)), name + ".")
        if markdown:
            out += [f"## `{name}`: {docs[name]}", "", "| key | type | default | meaning |",
                    "|---|---|---|---|"]
            out += [f"| `{r.name}` | {r.type.replace(' | ', ' or ')} | "
                    f"`{format_default(r.default)}` | {r.doc} |" for r in rows]
            out.append("")
        else:
            out.append(f"{name}: {docs[name]}")
            width = max(len(r.name) for r in rows)
            out += [f"  {r.name:<{width}}  {r.type} = {format_default(r.default)}  # {r.doc}"
                    for r in rows]
    return "\n".join(out).rstrip("\n")


def list_keys(args) -> None:
    print(key_table(args.section, args.markdown))
