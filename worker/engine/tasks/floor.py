"""The safety floor applied to a job's task fidelity: met, missed (the job fails with
`fidelity_floor_not_met`), off, or not judged (nothing measured for the task). The bounds and
their calibration are in modelpress/spec/floor.py, shared with the API's checks."""

from modelpress.spec.floor import DEFAULT_FLOORS


def overrides_of(floor) -> dict[str, float]:
    """The bounds a job's floor sets itself (none for \"default\" and \"off\")."""
    return floor if isinstance(floor, dict) else {}


def judge(task_result: dict, floor="default") -> dict:
    """metrics["floor"]: the mode, whether the result meets the floor (None: not judged, with why),
    the bounds that applied and each shortfall."""
    mode = "off" if floor == "off" else "custom" if isinstance(floor, dict) else "default"
    task_type = task_result["task"]["type"]
    bounds = {metric: overrides_of(floor).get(metric, default) for metric, _, default in DEFAULT_FLOORS.get(task_type, [])}
    verdict = {"mode": mode, "task": task_type, "bounds": bounds, "shortfalls": task_result.get("floor_shortfalls") or []}
    if task_result.get("fidelity") is None:
        return {**verdict, "met": None, "note": task_result.get("note") or f"no {task_type} fidelity is measured for this output"}
    if not bounds:
        return {**verdict, "met": None, "note": f"no floor is defined for the {task_type} task"}
    return {**verdict, "met": not verdict["shortfalls"]}


def failed(verdict: dict) -> bool:
    """The floor ends the job: it is on and the result misses it (a result not judged never fails)."""
    return verdict["mode"] != "off" and verdict["met"] is False


def message(verdict: dict) -> str:
    missed = "; ".join(f"{m['metric']} {'unmeasured' if m['value'] is None else format(m['value'], '.4f')} "
                       f"{'<' if m['direction'] == 'min' else '>'} {m['bound']}" for m in verdict["shortfalls"])
    return (f"the compressed model misses the {verdict['task']} fidelity floor: {missed} (the model and metrics are stored; "
            'set "floor": {"metric": bound} to change a bound or "floor": "off")')
