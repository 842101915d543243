"""Result files and what is made from them.

schema.py   the result file: typed schema, validation, atomic store, paths, `totobench validate`
table.py    the per-layer table of one result (rich), printed at the end of a run
export.py   leaderboard + per-layer tables as md / csv / json / html, `totobench export`
plots.py    layer-sweep plots by relative depth; `write_sweep_plots` for `totobench run`
compare.py  per-layer deltas of several models or runs, `totobench compare`

Only the schema is imported here, so that importing the package stays light (no matplotlib).
"""

from totobench.results.schema import (RESULT_SCHEMA_VERSION, created_now, depth_fraction,
                                      load_result, result_path, safe_name, validate_result,
                                      write_result_atomic)

__all__ = ["RESULT_SCHEMA_VERSION", "created_now", "depth_fraction", "load_result", "result_path",
           "safe_name", "validate_result", "write_result_atomic"]
