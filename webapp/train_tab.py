"""The Train tab: train the detector or the embedder on the collected labels (from
scratch, or fine-tuning a registered version), watch it train, compare it with the model
in use on a test split, then promote or roll back.

Thin like the rest of the UI: callbacks call ``pipeline.training.jobs`` / ``pipeline.training.registry``
and map the results onto components. The job runs in a process of its own (never in
the app's threads) and writes its progress to a file in the data folder; a ``gr.Timer``
polls it, so a page reload or a second tab shows the same job. Starting, cancelling,
promoting and rolling back need the "train" permission (admins); watching needs "view".

The network to start from is a fixed list (no typed-in values: Gradio refuses anything
else, and ``TrainRequest.resolved`` checks again); a model file path is never taken here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image as PILImage

from pipeline.context import Lab
from pipeline.errors import InvalidRequest
from pipeline.text import md
from pipeline.training import jobs as training
from pipeline.training import registry
from webapp.endpoints import Endpoints

MODEL_HEADERS = ["id", "kind", "name", "version", "in use", "created", "run", "key metrics"]
RESULT_HEADERS = ["metric", "measured on", "in use", "candidate", "change"]
POLL_SECONDS = 2.0
#: where training starts (value -> label); anything else is refused
START_CHOICES = [
    ("Default: from scratch (detector: YOLOv8n on a CPU, YOLOv8s on a GPU; embedder: ResNet50 distilled "
     "from the model in use)", "default"),
    *[(f"From scratch: {name.removesuffix('.yaml')} (detector, random weights)", name)
      for name in training.ARCHITECTURES],
    ("Fine-tune: the registered version given below", "registered"),
]

INTRO = """### Train
Train the **detector** on the boxes of *reviewed* images, or the **embedder** on *named* faces:
**from scratch** (an architecture with random weights; the embedder learns from the model in
use) or **fine-tune** a version registered here. The data is split three ways (whole images /
whole people): **train** teaches, **select** picks the best checkpoint and the candidate's
threshold, **test** is used only for the comparison with the model in use, so the numbers
that decide a promotion come from data nothing was chosen on. Nothing changes for anyone
until an admin promotes the new model below; a rollback returns to any earlier one. The job
runs in its own process. Without a GPU it trains on the CPU with small settings (expect a
weak model from a few minutes of CPU time)."""


# -- what the tab shows ------------------------------------------------------------------
def status_markdown(job: training.JobRecord | None) -> str:
    if job is None:
        return "No training job yet."
    lines = [f"**{md(job.kind.capitalize())} job: {md(job.status)}** (started {md(job.started_at)} by process {job.pid})"]
    if job.splits:
        lines.append("Data: " + " · ".join(md(text) for text in job.splits.values()))
    if job.active:
        where = f"epoch {job.epoch}/{job.epochs} · " if job.epoch else ""
        eta = f" · about {_duration(job.eta_s)} left in this phase" if job.eta_s is not None else ""
        lines.append(f"Now: {where}{md(job.phase)}{eta}")
        if job.loss:
            lines.append("Loss: " + ", ".join(f"{md(k)} {v:.4g}" for k, v in job.loss.items()))
        if job.metrics:
            on = md(job.splits.get("select", "select split"))
            lines.append(f"Validation on the {on} (picks the checkpoint, not the promotion): "
                         + ", ".join(f"{md(k)} {v:.4g}" for k, v in job.metrics.items()))
    if job.message:
        lines.append(md(job.message))
    if job.error and job.error not in job.message:
        lines.append(f"Error: {md(job.error)}")
    return "  \n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def progress_html(job: training.JobRecord | None) -> str:
    pct = 0 if job is None else round(100 * (1.0 if job.status == "done" else job.fraction))
    colour = {"failed": "#d62728", "interrupted": "#d62728", "cancelled": "#7f7f7f"}.get(job.status if job else "", "#1f77b4")
    return (f'<div style="border:1px solid #bbb;border-radius:4px;height:18px;width:100%">'
            f'<div id="train-progress-bar" style="background:{colour};height:100%;width:{pct}%;border-radius:3px"></div>'
            f"</div><div style='font-size:12px'>{pct}%</div>")


def history_frame(job: training.JobRecord | None) -> pd.DataFrame:
    rows = [] if job is None else job.history[-200:]
    if not rows:
        return pd.DataFrame({"epoch": []})
    keep = ["stage", "epoch"]
    for row in rows:
        for k in row:
            if k not in keep and ("loss" in k or k.startswith(("metrics/", "val_acc", "val_rank1"))) \
                    and k not in ("val_acc_best_thr",):
                keep.append(k)
    cols = [k for k in keep if any(k in r for r in rows)]
    # every metric here is measured on the select split (it picks the checkpoint)
    names = [("select " + c.replace("metrics/", "").replace("(B)", "").replace("val_", "").replace("val/", "")
              if c.startswith(("metrics/", "val_", "val/")) else c) for c in cols]
    return pd.DataFrame([[r.get(k, "") for k in cols] for r in rows], columns=names)


def _png(path: str) -> PILImage.Image:
    # handed over as pixels: Gradio only serves files from its allowed folders, and the
    # data folder may be anywhere
    with PILImage.open(path) as img:
        return img.convert("RGB")


def run_choices(lab: Lab) -> list[tuple[str, str]]:
    out = []
    for doc in training.list_runs(lab):
        label = f"{doc.get('run_id')} ({doc.get('status', '?')})"
        if doc.get("version_id"):
            label += f" -> version #{doc['version_id']}"
        out.append((label, str(doc.get("run_id"))))
    return out


def run_results(lab: Lab, run_id: str | None) -> tuple[pd.DataFrame, str, list[tuple[str, str]]]:
    """Comparison tables (one block per evaluation), a note, and the plots of a run."""
    empty = pd.DataFrame(columns=RESULT_HEADERS)
    if not run_id:
        return empty, "No finished run yet.", []
    comparisons = training.run_comparisons(lab, run_id)
    if not comparisons:
        doc = registry.read_json(registry.runs_root(lab) / run_id / "run.json") or {}
        return empty, md(f"Run {run_id}: {doc.get('status', 'unknown')} (no evaluation). {doc.get('message', '')}"), []
    rows, notes, gallery = [], [], []
    doc = registry.read_json(registry.runs_root(lab) / run_id / "run.json") or {}
    for comp in comparisons.values():
        rows += comp.table()  # every row names the data it was measured on
        d = comp.details
        if comp.kind == "detector":
            conf = (d.get("per_model", {}).get("candidate") or {}).get("operating_conf")
            notes.append(f"{comp.data}, IoU 0.5; precision/recall/F1 at each model's own threshold"
                         + (f" (candidate: {conf:.3f}, fitted on the select split)" if conf is not None else ""))
        elif "protocol" in d:
            notes.append(f"{comp.data}; {d['protocol']}")
        else:
            thr = doc.get("match_threshold")
            notes.append(f"{comp.data}, {d.get('pairs')} pairs" + (
                f"; candidate's threshold {thr:.3f} fitted on the select split" if isinstance(thr, float) else ""))
        gallery += [(_png(path), f"{comp.data}: {label}") for label, path in comp.plots.items() if Path(path).is_file()]
    names = next(iter(comparisons.values())).names
    frame = pd.DataFrame(rows, columns=["metric", "measured on", md(names[0]), "candidate", "change"][: 3 + len(names)])
    head = f"Run **{md(run_id)}**"
    if doc.get("start"):
        head += f": {md(doc['start'])}"
    if doc.get("version_id"):
        head += f"; registered as version **#{doc['version_id']}** (promote it below)"
    return frame, head + "  \n" + "  \n".join(md(n) for n in notes), gallery


def models_frame(lab: Lab) -> pd.DataFrame:
    return pd.DataFrame(registry.versions_table(lab), columns=MODEL_HEADERS)


def in_use_markdown(lab: Lab) -> str:
    parts = []
    for kind in registry.KINDS:
        info = registry.active_version(lab, kind)
        parts.append(f"{kind}: **{md(info.label() if info else registry.in_use_spec(lab, kind) + ' (default)')}**")
    return "In use: " + " · ".join(parts)


def start_request(kind: str, epochs: float | None, minutes: float | None, select_share: float, test_share: float,
                  start_from: str | None, version: float | None, imgsz: float | None, batch: float | None,
                  seed: float | None) -> training.TrainRequest:
    """The Train tab's inputs as a request. ``start_from`` is one of START_CHOICES'
    values (an architecture name goes on to TrainRequest.resolved, which checks it)."""
    start_from = start_from or "default"
    if start_from == "registered" and not version:
        raise InvalidRequest("Give the id of the registered version to fine-tune (first column of the models table).")
    return training.TrainRequest(
        kind=kind, epochs=int(epochs) if epochs else None, minutes=float(minutes) if minutes else None,
        select_fraction=float(select_share), test_fraction=float(test_share),
        model=None if start_from in ("default", "registered") else start_from,
        init_version=int(version) if start_from == "registered" else None,
        imgsz=int(imgsz) if imgsz else None, batch=int(batch) if batch else None, seed=int(seed or 0))


# -- the tab --------------------------------------------------------------------------------
def build_train_tab(lab: Lab, endpoint: Endpoints) -> None:
    """Create the tab's components inside the caller's ``gr.Tab("Train")``. Every callback
    is declared with ``endpoint`` (webapp/endpoints.py), which checks the role first."""
    gr.Markdown(INTRO)
    with gr.Row():
        kind = gr.Radio(["detector", "embedder"], value="detector", label="Model to train", elem_id="train-kind")
        epochs = gr.Number(label="Epochs (0: this machine's default)", precision=0, value=0, elem_id="train-epochs")
        minutes = gr.Number(label="Time cap (minutes)", value=10, elem_id="train-minutes")
        select_share = gr.Slider(0.1, 0.4, value=0.2, step=0.05, label="Select share (checkpoint, threshold)",
                                 elem_id="train-select")
        test_share = gr.Slider(0.1, 0.4, value=0.2, step=0.05, label="Test share (decides promotion)",
                               elem_id="train-test")
    with gr.Row():
        start_from = gr.Dropdown(START_CHOICES, value="default", allow_custom_value=False, label="Start from",
                                 elem_id="train-start-from")
        start_version = gr.Number(label="Registered version to fine-tune (id)", precision=0, value=0,
                                  elem_id="train-start-version")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            imgsz = gr.Number(label="Detector image size (0: 416 CPU / 640 GPU)", precision=0, value=0)
            batch = gr.Number(label="Batch size (0: default)", precision=0, value=0)
            seed = gr.Number(label="Seed (split and training)", precision=0, value=0)
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
    # filled when a page opens (train_page_load below), after the role check: a callable
    # value would make an undeclared page-load endpoint that anyone logged in could call
    status = gr.Markdown(elem_id="train-status")
    bar = gr.HTML(progress_html(None), elem_id="train-progress")
    history = gr.Dataframe(history_frame(None), label="Epochs (loss; validation on the select split)",
                           interactive=False, elem_id="train-history", max_height=260)

    gr.Markdown("### Candidate vs model in use (on the test split: data that did not train or select it)")
    runs = gr.Dropdown(choices=run_choices(lab), value=(run_choices(lab) or [(None, None)])[0][1], label="Run",
                       elem_id="train-run")
    initial = run_results(lab, runs.value)
    note = gr.Markdown(initial[1], elem_id="train-results-note")
    results = gr.Dataframe(initial[0], label="Metrics", interactive=False, elem_id="train-results")
    gallery = gr.Gallery(initial[2], label="Plots", columns=3, height="auto", object_fit="contain",
                         elem_id="train-plots")

    gr.Markdown("### Models (admin)")
    in_use = gr.Markdown(elem_id="train-in-use")
    models = gr.Dataframe(pd.DataFrame(columns=MODEL_HEADERS), label="Registered models", interactive=False,
                          elem_id="train-models")
    with gr.Row():
        version = gr.Number(label="Version id (0: none)", precision=0, value=0, elem_id="train-version")
        confirm = gr.Checkbox(label="Switch the model for everyone (embedder: re-embeds every face first)",
                              elem_id="train-confirm")
        promote = gr.Button("Promote", variant="primary", elem_id="train-promote")
    with gr.Row():
        rb_kind = gr.Radio(["detector", "embedder"], value="detector", label="Roll back")
        rollback = gr.Button("Roll back (to the version given above, or the previous one)", elem_id="train-rollback")
    model_message = gr.Markdown(elem_id="train-model-message")

    with gr.Accordion("Embedder augmentation preview", open=False):
        preview = gr.Button("Show augmentation on a few stored faces", elem_id="train-preview-button")
        preview_image = gr.Image(label="First column: the aligned face; then random training augmentations",
                                 interactive=False, elem_id="train-preview")

    last_key = gr.State("")
    timer = gr.Timer(POLL_SECONDS)

    # -- callbacks ---------------------------------------------------------------------
    @endpoint("train_page_load")
    def on_page_load() -> tuple[Any, ...]:
        job = training.read_job(lab)
        return status_markdown(job), progress_html(job), history_frame(job), in_use_markdown(lab), models_frame(lab)

    gr.context.Context.root_block.load(on_page_load, None, [status, bar, history, in_use, models],
                                       api_name=on_page_load.api_name, api_visibility="private")

    @endpoint("train_start")
    def on_start(k: str, ep: float | None, mins: float | None, sel: float, test: float, start_at: str | None,
                 vid: float | None, size: float | None, bs: float | None, sd: float | None) -> tuple[Any, ...]:
        job = training.start_training(lab, start_request(k, ep, mins, sel, test, start_at, vid, size, bs, sd))
        return status_markdown(job), progress_html(job), history_frame(job)

    start.click(on_start, [kind, epochs, minutes, select_share, test_share, start_from, start_version, imgsz, batch,
                           seed], [status, bar, history], api_name=on_start.api_name)

    @endpoint("train_cancel")
    def on_cancel() -> str:
        return md(training.cancel_training(lab))

    cancel.click(on_cancel, outputs=[status], api_name=on_cancel.api_name)

    @endpoint("train_tick")
    def on_tick(key: str) -> tuple[Any, ...]:
        job = training.read_job(lab)
        new_key = "" if job is None else f"{job.job_id}:{job.status}:{len(job.history)}"
        head = (status_markdown(job), progress_html(job))
        if new_key == key:
            return (*head, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), key)
        # results, runs and models change only when a job has just ended
        just_ended = job is not None and not job.active and job.run_id is not None \
            and key.rsplit(":", 1)[0] != new_key.rsplit(":", 1)[0]
        if not just_ended:
            return (*head, history_frame(job), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), new_key)
        frame, text, plots = run_results(lab, job.run_id)
        return (*head, history_frame(job), gr.update(choices=run_choices(lab), value=job.run_id), text, frame, plots,
                models_frame(lab), in_use_markdown(lab), new_key)

    timer.tick(on_tick, [last_key], [status, bar, history, runs, note, results, gallery, models, in_use, last_key],
               show_progress="hidden", api_name=on_tick.api_name, api_visibility="private")

    @endpoint("train_run")
    def on_run(run_id: str | None) -> tuple[Any, ...]:
        frame, text, plots = run_results(lab, run_id)
        return text, frame, plots

    runs.input(on_run, [runs], [note, results, gallery], api_name=on_run.api_name)

    @endpoint("train_promote")
    def on_promote(vid: float | None, sure: bool, request: gr.Request, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        user = endpoint.allow("train_promote", request)
        if not vid:
            raise gr.Error("Type the id of the version to promote (first column of the table).", print_exception=False)
        if not sure:
            raise gr.Error("Tick the box to confirm: this switches the model for everyone.", print_exception=False)
        text = registry.promote(lab, int(vid), lambda f, t: progress(f, desc=t), user=user)
        return md(text), models_frame(lab), in_use_markdown(lab)

    promote.click(on_promote, [version, confirm], [model_message, models, in_use], api_name=on_promote.api_name)

    @endpoint("train_rollback")
    def on_rollback(k: str, vid: float | None, sure: bool, request: gr.Request,
                    progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        user = endpoint.allow("train_rollback", request)
        if not sure:
            raise gr.Error("Tick the box to confirm: this switches the model for everyone.", print_exception=False)
        text = registry.rollback(lab, k, int(vid) if vid else None, lambda f, t: progress(f, desc=t), user=user)
        return md(text), models_frame(lab), in_use_markdown(lab)

    rollback.click(on_rollback, [rb_kind, version, confirm], [model_message, models, in_use],
                   api_name=on_rollback.api_name)

    @endpoint("train_preview")
    def on_preview() -> Any:
        return training.augmentation_preview_image(lab)

    preview.click(on_preview, outputs=[preview_image], api_name=on_preview.api_name)
