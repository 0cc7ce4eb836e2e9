"""Write docs/cli-flags.md: every `blockdiff` verb and every flag, with its default and help text, read from the
argument parser itself (`blockdiff.cli.build_parser`), so the reference cannot drift from the code:
tests/test_docs.py fails when the committed file differs from what this prints.

    python scripts/cli_reference.py > docs/cli-flags.md
"""

from __future__ import annotations

import argparse
import sys


def reference() -> str:
    from blockdiff.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in list(getattr(sub, "lazy", {})):  # verbs whose parser is built only when chosen (eval): build them
        sub(parser, argparse.Namespace(), [name])
    lines = ["# Every flag of every verb", "",
             "Generated from the argument parser by `python scripts/cli_reference.py > docs/cli-flags.md` (a test checks",
             "it is current). How the verbs fit together: [cli.md](cli.md).", ""]
    for verb, p in sub.choices.items():
        lines += [f"## `blockdiff {verb}`", "", (p.description or "").strip().replace("\n", " "), "",
                  "| flag | default | what |", "|---|---|---|"]
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            flag = ", ".join(a.option_strings) or a.dest
            if a.option_strings and a.nargs != 0:
                flag += f" {a.metavar or a.dest.upper()}"
            empty = a.default is None or a.default is False or a.default == argparse.SUPPRESS
            default = "" if empty else f"`{a.default}`"
            if a.required:
                default = "required"
            what = " ".join((a.help or "").replace("%(default)s", str(a.default)).split()).replace("|", "\\|")
            if a.choices and not isinstance(a, argparse._SubParsersAction):
                what += f" (one of: {', '.join(map(str, a.choices))})"
            flag = flag.replace("|", "\\|")  # a metavar such as dev|final|FILE would split the table cell
            lines.append(f"| `{flag}` | {default} | {what} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())
