"""``noisewise models | promote | rollback``: what each registered version is, and moving its aliases.

Every version carries MLflow tags and a description saying how it was made (trained, imported, calibrated,
recalibrated from version N on M feedback labels), the method and kind of each guarantee, whether its abstention
is certified and what share of the calibration data it accepts. ``promote`` moves an alias only to a version
that decides (every guarantee of a kind other than none, and an abstention threshold that accepts something),
unless ``--force``; every move is recorded, so ``rollback`` can undo it. The registry code is
``noisewise.models.registry``.
"""

from __future__ import annotations

import argparse
import sys

#: Exit status of a refused promotion (as for any other refused command line: the alias did not move).
EXIT_REFUSED = 2

_PROMOTE_EPILOG = """\
A version is refused (exit status 2, the alias does not move) when one of its guarantees is of kind none, or
when it abstains on every input (nothing certified: it accepts 0% of the calibration data); --force moves the
alias anyway and records the reasons it overrode as the version's tag noisewise.forced.ALIAS. An uncalibrated
version is not refused: it states no guarantee and the service refuses to serve it. Each move pushes the
alias's previous version on its history (registered-model tag noisewise.alias_history.ALIAS), which
`noisewise rollback` returns to. A running service switches at its next alias check."""


def add_parsers(commands, common) -> None:
    """Register ``models``, ``promote`` and ``rollback``; ``common`` is noisewise.services.cli (its helpers)."""
    from noisewise.models.choices import CHAMPION

    models = commands.add_parser(
        "models", help="list registered models, their versions and aliases, and what each version is",
        description="List registered models (all, or NAME) in the MLflow store: aliases, and per version how it "
        "was made, the method and kind of each guarantee (prediction sets, abstention, OOD), whether its "
        "abstention is certified and what share of the calibration data it accepts. With NAME, each version's "
        "description follows the table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    models.add_argument("name", nargs="?", default=None, metavar="NAME", help="one registered model")
    models.add_argument("--json", action="store_true", help="print one JSON object")
    models.set_defaults(handler=lambda args: cmd_models(args, common))

    promote = commands.add_parser(
        "promote", help="point an alias (default champion) to a version, if that version decides",
        description="Point NAME@ALIAS to NAME/VERSION.", epilog=_PROMOTE_EPILOG,
        formatter_class=_Formatter)
    promote.add_argument("name", metavar="NAME", help="registered model")
    promote.add_argument("version", metavar="VERSION", help="version number to point the alias to")
    promote.add_argument("--alias", default=CHAMPION, help="alias to move")
    promote.add_argument("--force", action="store_true",
                         help="move the alias even to a version with a guarantee of kind none or that abstains on "
                         "every input")
    promote.add_argument("--json", action="store_true", help="print one JSON object")
    promote.set_defaults(handler=lambda args: cmd_promote(args, common))

    rollback = commands.add_parser(
        "rollback", help="point an alias back to the version it pointed to before its last move",
        description="Point NAME@ALIAS back to the version it pointed to before its last move (promote, train "
        "--promote, recalibrate, or an earlier rollback's target); repeated, it goes further back. Fails when no "
        "move of the alias was recorded.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rollback.add_argument("name", metavar="NAME", help="registered model")
    rollback.add_argument("--alias", default=CHAMPION, help="alias to move back")
    rollback.add_argument("--json", action="store_true", help="print one JSON object")
    rollback.set_defaults(handler=lambda args: cmd_rollback(args, common))


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's line breaks and still shows the defaults."""


def cmd_models(args: argparse.Namespace, common) -> int:
    from noisewise.models import registry

    listed = registry.list_models(args.name)
    if args.json:
        common._emit(args, {"tracking_uri": registry.tracking_uri(), "models": listed}, "")
        return 0
    if not listed:
        print(f"no registered models in {registry.tracking_uri()}")
        return 0
    blocks = [models_text(model, descriptions=args.name is not None) for model in listed]
    print("\n\n".join(blocks))
    return 0


def cmd_promote(args: argparse.Namespace, common) -> int:
    from noisewise.models import registry

    version = _version_number(args.version, common)
    try:
        move = registry.promote_version(args.name, version, args.alias, force=args.force)
    except registry.PromotionRefused as err:
        print(f"noisewise: error: refused: {err}; pass --force to move it anyway", file=sys.stderr)
        return EXIT_REFUSED
    payload = {"model_name": move.name, "alias": move.alias, "version": move.version, "previous": move.previous,
               "forced": bool(move.overridden), "overridden": list(move.overridden)}
    common._emit(args, payload, move_text(move, "promoted"))
    return 0


def cmd_rollback(args: argparse.Namespace, common) -> int:
    from noisewise.models import registry

    move = registry.rollback(args.name, args.alias)
    payload = {"model_name": move.name, "alias": move.alias, "version": move.version, "previous": move.previous,
               "history": registry.alias_history(move.name, move.alias)}
    common._emit(args, payload, move_text(move, "rolled back"))
    return 0


def _version_number(text: str, common) -> str:
    if not text.isdigit() or int(text) < 1:
        raise common.UsageError(f"VERSION: expected a version number (1, 2, ...), got {text!r}")
    return str(int(text))


def move_text(move, verb: str) -> str:
    """One line per alias move: where the alias points now and where it pointed before."""
    before = f"was version {move.previous}" if move.previous else "was not set"
    if move.previous == move.version:
        return f"{move.name}@{move.alias} already points to version {move.version}; nothing moved"
    text = f"{verb}: {move.name}@{move.alias} -> version {move.version} ({before})"
    if move.overridden:
        text += "\n  forced past: " + "; ".join(move.overridden)
    return text


def version_row(version: dict) -> list[str]:
    """The table cells of one version: VERSION, ALIASES, MADE, SETS, ABSTENTION, OOD, ACCEPT, CREATED."""
    from noisewise.models.registry import _float, _percent

    tags = version["tags"]
    if "noisewise.calibrated" not in tags:  # registered before versions carried their facts
        sets = abstention = ood = accept = "?"
    elif tags["noisewise.calibrated"] != "true":
        sets, abstention, ood, accept = "not calibrated", "-", "-", "-"
    else:
        sets = (f"{tags.get('noisewise.sets.method', '?')} {_percent(tags.get('noisewise.sets.coverage'))} "
                f"{tags.get('noisewise.sets.kind', 'none')}")
        certified = tags.get("noisewise.certified") == "true"
        abstention = (f"{'certified' if certified else 'NOTHING CERTIFIED'} r*={tags.get('noisewise.abstention.risk', '?')}"
                      f" {tags.get('noisewise.abstention.kind', 'none')}")
        ood = f"{tags.get('noisewise.ood.method', '?').replace(' p-value', '')} {tags.get('noisewise.ood.kind', 'none')}"
        rate = _float(tags.get("noisewise.accept_rate"))
        accept = "?" if rate is None else f"{rate:.1%}"
    return [version["version"], ",".join(version["aliases"]) or "-", made(tags, version.get("name")), sets,
            abstention, ood, accept, version["created"].replace("T", " ")[:16]]


def made(tags: dict, name: str | None = None) -> str:
    """How a version was made, in a few words."""
    origin = tags.get("noisewise.origin")
    source = tags.get("noisewise.derived_from", "?")
    if name and source.startswith(f"{name}/"):
        source = "v" + source[len(name) + 1:]
    if origin == "trained":
        return (f"trained {tags.get('noisewise.recipe', '?')} on {tags.get('noisewise.trained_on', '?')}, "
                f"noise {tags.get('noisewise.noise', '?')}")
    if origin == "imported":
        return f"imported {tags.get('noisewise.source', '?')}"
    if origin == "calibrated":
        return f"calibrated from {source} on {tags.get('noisewise.calibration_data', '?')}"
    if origin == "recalibrated":
        return f"recalibrated from {source} on {tags.get('noisewise.feedback_labels', '?')} feedback labels"
    return "? (no record)"


def models_text(model: dict, descriptions: bool = False) -> str:
    """A model's aliases and a table of its versions (and, with ``descriptions``, each version's description)."""
    aliases = ", ".join(
        f"{alias} -> {version}" + (f" (before: {model['alias_history'][alias][-1]})"
                                   if model["alias_history"].get(alias) else "")
        for alias, version in sorted(model["aliases"].items())) or "none"
    lines = [f"{model['name']}: {len(model['versions'])} version(s); aliases: {aliases}"]
    header = ["VERSION", "ALIASES", "MADE", "SETS", "ABSTENTION", "OOD", "ACCEPT", "CREATED (UTC)"]
    rows = [version_row({**v, "name": model["name"]}) for v in model["versions"]]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
              for row in [header, *rows]]
    for version in model["versions"] if descriptions else []:
        blockers = version.get("blockers")
        lines.append(f"\n  version {version['version']}:")
        lines += [f"    {line}" for line in (version["description"] or "(no description)").splitlines()]
        if blockers:
            lines.append(f"    promote refuses it without --force: {'; '.join(blockers)}")
        forced = {k: v for k, v in version["tags"].items() if k.startswith("noisewise.forced.")}
        lines += [f"    promoted to @{k.split('.', 2)[2]} with --force past: {v}" for k, v in forced.items()]
    return "\n".join(lines)

