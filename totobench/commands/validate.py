"""`totobench validate FILE...`: check result files against the result schema."""

from __future__ import annotations

from pathlib import Path

from totobench.errors import DataError
from totobench.results.schema import check_schema_version, read_result_json, validate_result


def cli_validate(args) -> int:
    """Check each file of `args.files` against the schema; a folder means every *.json below it
    that has a schema_version field (other JSON there is not a result file and is skipped).

    Prints one line per problem, prefixed by the file, or "FILE: ok (...)" for a valid file.
    Returns 0 when every file is valid, 1 otherwise.
    """
    files: list[tuple[Path, bool]] = []  # (path, named explicitly)
    for name in args.files:
        p = Path(name)
        files.extend([(f, False) for f in sorted(p.rglob("*.json"))] if p.is_dir() else [(p, True)])
    invalid = checked = 0
    for path, explicit in files:
        try:
            obj = read_result_json(path)
            if not explicit and "schema_version" not in obj:
                continue  # a folder may hold other JSON (exports, predictions)
            checked += 1
            check_schema_version(obj, path)
        except DataError as err:
            print(err)
            invalid += 1
            continue
        problems = validate_result(obj)
        for problem in problems:
            print(f"{path}: {problem}")
        if problems:
            invalid += 1
        else:
            print(f"{path}: ok ({obj['model']['name']} on {obj['task']['name']}, "
                  f"{len(obj['per_layer'])} layers, best layer {obj['best_layer']['layer']})")
    if checked == 0 and invalid == 0:
        print("no result files found in " + ", ".join(args.files))
        return 1
    if checked > 1:
        print(f"{checked - invalid} of {checked} files valid")
    return 1 if invalid else 0
