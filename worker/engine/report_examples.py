"""The report's "What the task sees" section: the floor and how the result met it, and the drawn
eval images (metrics.examples) embedded as PNG data URIs, each with what was drawn on it."""

import base64
from html import escape

from modelpress.spec.floor import DEFAULT_FLOORS


STYLE = ("div.examples { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; } "
         "figure.example { max-width: 100%; } figure.example figcaption { font-weight: 400; max-width: 22rem; } "
         "figure.example img { image-rendering: pixelated; max-width: 100%; height: auto; border: 1px solid #dde2ea; }")
# How to read the drawings of each task (the legend's tail).
READING = {"detection": "; a lost or new detection is drawn thick and named", "segmentation": "; the last panel is red "
           "where the two masks differ", "ctc": "; mismatched characters are red", "classification": "; a changed top-1 is red",
           "keypoints": "; the original's keypoints are numbered rings, the compressed model's dots, a miss joined by a red line"}


def _number(value) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else escape(str(value))


def floor_section(verdict: dict | None, fidelity: dict | None, steps: list[dict]) -> str:
    """Each bound of the floor against the figure it judged, and what got the result there (a repair)."""
    if not verdict:
        return ""
    directions = {metric: direction for metric, direction, _ in DEFAULT_FLOORS.get(verdict["task"], [])}
    missed = {m["metric"] for m in verdict.get("shortfalls") or []}
    rows = "".join(
        f'<tr{" class=warn" if metric in missed else ""}><th>{escape(metric)}</th><td>{_number((fidelity or {}).get(metric))}</td>'
        f'<td>{"≥" if directions.get(metric) == "min" else "≤"} {_number(bound)}</td><td>{"missed" if metric in missed else "met"}</td></tr>'
        for metric, bound in verdict.get("bounds", {}).items())
    state = {True: "met", False: "NOT met", None: "not judged"}[verdict.get("met")]
    how = [f"The {escape(verdict['mode'])} floor for {escape(verdict['task'])}: {state}"
           + (f" ({escape(verdict['note'])})" if verdict.get("note") else "")
           + (" — the floor is off, so it does not fail the job" if verdict["mode"] == "off" else "") + "."]
    for index, step in enumerate(steps):
        repair = step.get("repair") or {}
        if repair.get("needed"):
            tried = [a["attempt"] for a in repair.get("attempts", []) if "tune" in a]
            outcome = f"met after the repair “{escape(tried[-1])}”" if repair.get("met") and tried else "no repair met it"
            how.append(f"Step {index + 1} ({escape(step['type'])}) was below it first: {outcome}, "
                       f"{len(tried)} candidate(s) tried.")
    table = ('<table id="floor"><thead><tr><th>metric</th><th>measured</th><th>bound</th><th></th></tr></thead>'
             f"<tbody>{rows}</tbody></table>") if rows else ""
    return f'<h3>The floor</h3><p id="floor-how">{" ".join(how)}</p>{table}'


def _described(entry: dict) -> str:
    """The text beside an image: what the metadata says was drawn."""
    if "lost" in entry:
        def listed(boxes):
            return ", ".join(f"{b['class']} {b['score']:.2f}{'' if b['status'] == 'matched' else ' ' + b['status']}"
                             for b in boxes) or "none"
        return (f"{entry['lost']} lost, {entry['new']} new. Original: {escape(listed(entry['original']))}. "
                f"Compressed: {escape(listed(entry['compressed']))}.")
    if "differing_pixels" in entry:
        return f"{entry['differing_pixels']} mask pixels differ (pixel agreement {entry['pixel_agreement']:.4f})."
    if "edit_distance" in entry:
        return (f"original “{escape(entry['original'])}”, compressed “{escape(entry['compressed'])}” "
                f"(edit distance {entry['edit_distance']}).")
    if "cosine" in entry:
        return f"cosine {entry['cosine']:.4f}."
    if "missed" in entry:
        missed = ", ".join(str(k) for k in entry["missed"]) or "none"
        return f"{len(entry['original'])} keypoint(s); missed (beyond the PCK threshold): {escape(missed)}."
    return (f"top-1: original class {entry['original']['class']} ({entry['original']['score']:.3f}), "
            f"compressed class {entry['compressed']['class']} ({entry['compressed']['score']:.3f}).")


def examples_section(examples: dict | None, pictures: dict[str, bytes]) -> str:
    if not examples:
        return ""
    if "error" in examples:
        return f'<p id="examples">The example images could not be drawn: {escape(examples["error"])}</p>'
    if not examples.get("images"):
        return f'<p id="examples">{escape(examples.get("note", "no example images"))}</p>'
    colours = examples["colours"]
    key = (f'<p><span style="color:{colours["original"]}">■ original</span> · '
           f'<span style="color:{colours["compressed"]}">■ compressed</span> · '
           f'<span style="color:{colours["differs"]}">■ differs</span>. Images where the two differ most by the '
           f"task's own measure, then one where they agree{READING.get(examples.get('task'), '')}.</p>")
    figures = []
    for entry in examples["images"]:
        data = pictures.get(entry["file"])
        if data is None:
            continue
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        figures.append(f'<figure class="example"><img id="{escape(entry["element_id"])}" src="{uri}" width="{entry["width"]}" '
                       f'height="{entry["height"]}" alt="eval image {entry["index"]}">'
                       f"<figcaption><small>eval image {entry['index']}: {_described(entry)}</small></figcaption></figure>")
    return f'<div id="examples">{key}<div class="examples">{"".join(figures)}</div></div>'


def section(metrics: dict, pictures: dict[str, bytes] | None) -> str:
    floor = floor_section(metrics.get("floor"), ((metrics.get("comparison") or {}).get("task") or {}).get("fidelity"),
                          metrics.get("steps", []))
    try:
        shown = examples_section(metrics.get("examples"), pictures or {})
    except Exception as exc:  # noqa: BLE001 — the pictures only report: never the job's failure
        shown = f'<p id="examples">The example images could not be shown: {escape(exc.__class__.__name__)}</p>'
    if not floor and not shown:
        return ""
    return f"<h2>What the task sees</h2>{floor}{shown}"
