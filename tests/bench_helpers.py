"""Helpers of the benchmark tests (tests/test_bench*.py)."""

# Dicts whose keys are names (runners, sides, models, depths, config fields), not fields of the report.
NAMED = {"attention", "compile_s", "first_call_s", "config", "flax_config", "hf_config", "matmul_peak", "versions",
         "thread_env", "isa", "models", "sides", "forward", "train"}


def key_paths(obj, prefix: str = "") -> set[str]:
    """Every key path of a JSON value ("results.[].sides.*.prefill_s.median"): list items merged, the keys of
    a name-keyed dict (NAMED) written as "*", so that two runs of different sizes compare field by field."""
    if isinstance(obj, list):
        return set().union(*(key_paths(x, prefix + "[].") for x in obj if isinstance(x, (dict, list))))
    if not isinstance(obj, dict):
        return set()
    named = prefix.rstrip(".").rsplit(".", 1)[-1] in NAMED
    paths = set()
    for k, v in obj.items():
        key = prefix + ("*" if named else k)
        paths |= {key} | key_paths(v, key + ".")
    return paths
