"""recipe.json: the job's POST body with what the job decided by measurement written in as values.

A step can leave a choice to the run: `activation_type: auto` times uint8 against int8, an accuracy
guard (or the repair of a result below the job's floor) picks a calibration, repairs and the layers
kept float, `target_macs` / `target_params` search for a ratio. Those outcomes depend on the machine's load (timing) or cost a search, so the recipe records
the decided value, not the question: posting it back builds the same model bit for bit on the same
versions. Seeds are already explicit (every default is filled in when the job is accepted).
"""

import copy


def decided_steps(steps: list[dict], step_metrics: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the steps with decided values, one entry per value replaced: step, param, asked, decided)."""
    replayable, decisions = copy.deepcopy(steps), []

    def decide(index: int, params: dict, name: str, value) -> None:
        if params.get(name) != value:
            decisions.append({"step": index, "param": name, "asked": params.get(name), "decided": value})
            params[name] = value

    for index, (step, measured) in enumerate(zip(replayable, step_metrics)):
        params = step["params"]
        if step["type"] == "quantize":
            if params.get("activation_type") == "auto" and measured.get("activation_type") in ("uint8", "int8"):
                decide(index, params, "activation_type", measured["activation_type"])
            # A guard's search, or the repair of a result below the job's floor, that found a passing candidate.
            for search in (measured.get("guard"), measured.get("repair")):
                if not (search and search.get("met") and "calibration" in search):  # a repair not needed has none
                    continue
                # The search's first attempt is the asked calibration with the asked exclusions: with
                # the decided ones it builds the passing candidate at once, and still checks the promise.
                if search["calibration"] is not None:
                    decide(index, params, "calibration", search["calibration"])
                for name, value in search.get("repairs", {}).items():
                    decide(index, params, name, value)
                kept_float = [layer["layer"] for layer in search.get("kept_float", [])]
                decide(index, params, "exclude", [*params.get("exclude", []),
                                                  *(name for name in kept_float if name not in params.get("exclude", []))])
        elif step["type"] == "prune" and measured.get("ratio_found") is not None:
            target = "target_macs" if params.get("target_macs") is not None else "target_params"
            decisions.append({"step": index, "param": "ratio", "asked": {target: params[target]}, "decided": measured["ratio_found"]})
            params.update({"ratio": measured["ratio_found"], "target_macs": None, "target_params": None})
    return replayable, decisions
