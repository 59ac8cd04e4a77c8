"""The Train tab: fine-tune the detector or the embedder on the collected labels, watch
it train, compare it with the model in use on held-out data, then promote or roll back.

Thin like the rest of the UI: callbacks call ``pipeline.training`` / ``pipeline.registry``
and map the results onto components. The job runs in a background thread of the app
and writes its progress to a file in the data folder; a ``gr.Timer`` polls it, so a
page reload or a second tab shows the same job. Starting, cancelling, promoting and
rolling back need the "train" permission (admins); watching needs "view".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image as PILImage

from pipeline import registry, training
from pipeline.context import Lab
from pipeline.views import md
from webapp.endpoints import Endpoints

MODEL_HEADERS = ["id", "kind", "name", "version", "in use", "created", "run", "key metrics"]
RESULT_HEADERS = ["metric", "in use", "candidate", "change"]
POLL_SECONDS = 2.0

INTRO = """### Train
Fine-tune the **detector** on the boxes of *reviewed* images, or the **embedder** on *named*
faces. A part of the data (whole images / whole people) is held out; the new model and the
model in use are both measured on it. Nothing changes for anyone until an admin promotes the
new model below; a rollback returns to any earlier one. Without a GPU, training runs on the
CPU with small settings (expect a weak model from a few minutes of CPU time)."""


# -- what the tab shows ------------------------------------------------------------------
def status_markdown(job: training.JobRecord | None) -> str:
    if job is None:
        return "No training job yet."
    lines = [f"**{md(job.kind.capitalize())} job: {md(job.status)}** (started {md(job.started_at)} by process {job.pid})"]
    if job.active:
        where = f"epoch {job.epoch}/{job.epochs}" if job.epoch else md(job.phase)
        lines.append(f"Now: {where} · {md(job.phase)}")
        if job.loss:
            lines.append("Loss: " + ", ".join(f"{md(k)} {v:.4g}" for k, v in job.loss.items()))
        if job.metrics:
            lines.append("Validation: " + ", ".join(f"{md(k)} {v:.4g}" for k, v in job.metrics.items()))
    if job.message:
        lines.append(md(job.message))
    if job.error and job.error not in job.message:
        lines.append(f"Error: {md(job.error)}")
    return "  \n".join(lines)


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
    return pd.DataFrame([[r.get(k, "") for k in cols] for r in rows],
                        columns=[c.replace("metrics/", "").replace("(B)", "") for c in cols])


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
    for name, comp in comparisons.items():
        title = {"held_out": "held-out data", "lfw_test_half": "LFW test half"}.get(name, name)
        for row in comp.table():
            rows.append([f"{row[0]} ({title})", *row[1:]])
        d = comp.details
        if comp.kind == "detector":
            notes.append(f"{title}: {d.get('images')} images, {d.get('faces')} faces, IoU 0.5; "
                         "precision/recall/F1 at each model's own threshold (candidate: 0.25)")
        elif "protocol" in d:
            notes.append(f"{title}: {d.get('pairs')} pairs, {d['protocol']}")
        else:
            notes.append(f"{title}: {d.get('faces')} faces of {d.get('identities')} people, {d.get('pairs')} pairs")
        gallery += [(_png(path), f"{title}: {label}") for label, path in comp.plots.items() if Path(path).is_file()]
    names = next(iter(comparisons.values())).names
    frame = pd.DataFrame(rows, columns=["metric", md(names[0]), "candidate", "change"][: 2 + len(names)])
    doc = registry.read_json(registry.runs_root(lab) / run_id / "run.json") or {}
    head = f"Run **{md(run_id)}**"
    if doc.get("version_id"):
        head += f" registered as version **#{doc['version_id']}** (promote it below)"
    return frame, head + "  \n" + "  \n".join(md(n) for n in notes), gallery


def models_frame(lab: Lab) -> pd.DataFrame:
    return pd.DataFrame(registry.versions_table(lab), columns=MODEL_HEADERS)


def in_use_markdown(lab: Lab) -> str:
    parts = []
    for kind in registry.KINDS:
        info = registry.active_version(lab, kind)
        parts.append(f"{kind}: **{md(info.label() if info else registry.in_use_spec(lab, kind) + ' (default)')}**")
    return "In use: " + " · ".join(parts)


# -- the tab --------------------------------------------------------------------------------
def build_train_tab(lab: Lab, endpoint: Endpoints) -> None:
    """Create the tab's components inside the caller's ``gr.Tab("Train")``. Every callback
    is declared with ``endpoint`` (webapp/endpoints.py), which checks the role first."""
    gr.Markdown(INTRO)
    with gr.Row():
        kind = gr.Radio(["detector", "embedder"], value="detector", label="Model to train", elem_id="train-kind")
        epochs = gr.Number(label="Epochs (0: this machine's default)", precision=0, value=0, elem_id="train-epochs")
        minutes = gr.Number(label="Time cap (minutes)", value=10, elem_id="train-minutes")
        val_fraction = gr.Slider(0.1, 0.5, value=0.2, step=0.05, label="Held-out share", elem_id="train-val")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            arch = gr.Dropdown(["yolov8n.yaml", "yolov8s.yaml"], value=None, allow_custom_value=True,
                               label="Detector network (from scratch; empty: n on CPU, s on GPU)")
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
    history = gr.Dataframe(history_frame(None), label="Epochs (loss and validation)",
                           interactive=False, elem_id="train-history", max_height=260)

    gr.Markdown("### Candidate vs model in use (same held-out data)")
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
    def on_start(k: str, ep: float | None, mins: float | None, vf: float, net: str | None, size: float | None,
                 bs: float | None, sd: float | None) -> tuple[Any, ...]:
        req = training.TrainRequest(
            kind=k, epochs=int(ep) if ep else None, minutes=float(mins) if mins else None, val_fraction=float(vf),
            model=net or None, imgsz=int(size) if size else None, batch=int(bs) if bs else None, seed=int(sd or 0))
        job = training.start_training(lab, req)
        return status_markdown(job), progress_html(job), history_frame(job)

    start.click(on_start, [kind, epochs, minutes, val_fraction, arch, imgsz, batch, seed], [status, bar, history],
                api_name=on_start.api_name)

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
