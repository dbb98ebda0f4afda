"""The ``spd`` command line: segment, batch, models, demo, simulate, train, evaluate, bench-speed.

Exit codes: 0 success; 2 bad input or a model that cannot be used (``error: ...``, nothing written);
3 out of memory; 4 the result looks implausible and ``--strict`` was given (nothing written);
5 ``batch``: some cases failed (the results CSV says which and why; the others were written);
130 cancelled.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np

from .core import prompts, volume
from .core.distill import DEFAULT_NEIGHBOURS, DEFAULT_TAU
from .core.errors import InputError, SPDError, SPDWarning
from .core.files import (OutputSet, check_folder_writable, check_not_inputs, check_space, check_writable,
                         least_output_bytes)
from .core.models.registry import (BUNDLED_SPD_MODELS, DEFAULT_BACKBONE, DEFAULT_MODEL, cached_path, catalogue,
                                   check_device, downloadable, is_available, manual_download_message)
from .core.pipeline import SegmentOptions, load_model, segment, trained_axes
from .core.progress import Progress, tqdm_progress
from .core.sample import sample_case
from .core.volume import LABEL_SUFFIXES, SEGMENTATION_SUFFIXES, output_type_error
from .research.simulate import LEVELS, simulate

# train, evaluate, bench-speed and the demo's metrics import their modules when they run: those import
# torch (and MONAI, matplotlib), so `spd --help` and the argument check of every command stay quick.

EXIT_INPUT = 2  # bad input or unusable model: nothing written
EXIT_MEMORY = 3
EXIT_IMPLAUSIBLE = 4  # --strict and the result has warnings: nothing written
EXIT_CASES_FAILED = 5  # batch: some cases failed, the others were written
EXIT_CANCELLED = 130


def _options(args):
    """The segment options from the command line, checked (InputError before anything loads)."""
    return SegmentOptions(mode=args.mode, tau=args.tau, neighbours=args.neighbours, use_box=not args.no_box,
                          empty_slice=args.empty_slice, modality=args.modality, window=args.window,
                          slice_range=tuple(args.slice_range) if args.slice_range else None,
                          return_saliency=bool(args.saliency_out), batch_size=args.batch_size).validate()


def _segment_outputs(args) -> dict:
    """kind -> path of every output asked for; types and writable folders checked before any work."""
    out = args.out or f"{Path(args.image).name.split('.')[0]}_spd.seg.nrrd"
    wanted = {"out": (out, SEGMENTATION_SUFFIXES + LABEL_SUFFIXES, "--out"),
              "label": (args.label_out, LABEL_SUFFIXES + SEGMENTATION_SUFFIXES, "--label-out"),
              "saliency": (args.saliency_out, LABEL_SUFFIXES, "--saliency-out"),
              "audit": (args.audit_out, (".mrk.json",), "--audit-out")}
    outputs = {}
    for kind, (path, suffixes, option) in wanted.items():
        if not path:
            continue
        problem = output_type_error(path, suffixes, f"{option} file")
        if problem:
            raise InputError(problem)
        check_writable(path, what=f"{option} file")
        for other_kind, other in outputs.items():
            if Path(other).resolve() == Path(path).resolve():
                raise InputError(f"{option} and {wanted[other_kind][2]} are the same file {path}; give each "
                                 "output its own name.")
        outputs[kind] = Path(path)
    return outputs


def _check_mode(args, outputs: dict) -> None:
    """SPD mode and the SPD-only outputs need an SPD model: known from the name, before the model loads."""
    from .core.spd_model import resolve  # torch: only when a segment command runs

    is_spd = resolve(args.model) is not None
    if args.mode == "spd" and not is_spd:
        raise InputError(f"SPD mode needs an SPD model (for example {DEFAULT_MODEL} or a .spd.safetensors file); "
                         f"{args.model} is a backbone: use --mode raw or --mode auto.")
    raw = args.mode == "raw" or (args.mode == "auto" and not is_spd)
    if raw and ("saliency" in outputs or "audit" in outputs):
        why = "this run is --mode raw" if args.mode == "raw" else f"{args.model} is a backbone, so the run is raw"
        raise InputError(f"--saliency-out and --audit-out need SPD mode (a saliency map and a prompt audit); {why}. "
                         "Use an SPD model (spd models lists them) or leave those options out.")


SEGMENT_OPTION = {"out": "--out", "label": "--label-out", "saliency": "--saliency-out", "audit": "--audit-out"}


def _strict_failure(found) -> int:
    print(f"error: --strict: the result looks implausible ({len(found)} warning{'s' if len(found) > 1 else ''} "
          "above); nothing was written.", file=sys.stderr)
    return EXIT_IMPLAUSIBLE


def cmd_segment(args) -> int:
    t0 = time.perf_counter()
    options = _options(args)
    outputs = _segment_outputs(args)
    check_not_inputs({f"{SEGMENT_OPTION[kind]} file": path for kind, path in outputs.items()}, [args.image, args.points])
    _check_mode(args, outputs)
    vol = volume.read(args.image, allow_slice_gaps=args.allow_slice_gaps)
    for warning in vol.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.strict and vol.warnings:
        return _strict_failure(vol.warnings)
    check_space({path.parent: least_output_bytes(kind, int(np.prod(vol.shape))) for kind, path in outputs.items()})
    points = prompts.read(args.points)
    voxel_prompts = prompts.to_voxels(points, vol, axis=args.axis, preferred_axes=trained_axes(args.model, vol))
    if len(voxel_prompts.outside_lps):
        print(f"warning: {len(voxel_prompts.outside_lps)} of {len(points)} points lie outside the image and were "
              "dropped", file=sys.stderr)
    model = load_model(args.model, device=args.device, runtime=args.runtime, precision=args.precision)
    result = segment(vol, voxel_prompts, model, options, progress=tqdm_progress(disable=args.quiet))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.strict and result.warnings:
        return _strict_failure(result.warnings)
    segment_name = args.segment_name or ("SPD" if result.mode == "spd" else "SAM")
    method = "SPD" if result.mode == "spd" else "raw"
    try:
        with OutputSet() as files:  # all outputs appear together, or none
            volume.write_segmentation(files.add(outputs["out"]), result.mask, vol.ijk_to_lps,
                                      segment_name=segment_name, method=method)
            if "label" in outputs:
                volume.write_segmentation(files.add(outputs["label"]), result.mask, vol.ijk_to_lps,
                                          segment_name=segment_name, method=method)
            if "saliency" in outputs and result.saliency is not None:
                volume.write_image(files.add(outputs["saliency"]), result.saliency, vol.ijk_to_lps)
            if "audit" in outputs and result.audit:
                write_audit(files.add(outputs["audit"]), result, vol)
            written = [str(p) for p in files.paths]
    except OSError as exc:  # a writer outside files.atomic_write (the writers say which file and why)
        raise InputError(f"Could not write the outputs ({exc}); nothing was written.") from exc
    seconds = time.perf_counter() - t0
    how = "" if result.audit else (f"; the clicks{' and a box around them' if options.use_box else ' (no box)'} "
                                   f"through {result.decoder}")
    print(f"{result.summary()}, {seconds:.1f} s{how}; axis: {result.axis_note} -> " + ", ".join(written))
    return 0


def cmd_batch(args) -> int:
    """Many cases, one model load: a folder or a manifest, resumable, in this process or on a Ray cluster."""
    from .core import batch

    t0 = time.perf_counter()
    for option, value, least in (("--workers", args.workers, 1), ("--cpus-per-worker", args.cpus_per_worker, 1),
                                 ("--retries", args.retries, 0)):
        if value is not None and value < least:
            raise InputError(f"{option} is {value}; it must be a whole number >= {least}.")
    settings = batch.Settings(options=_options(args), axis=args.axis, segment_name=args.segment_name,
                              strict=args.strict)
    cases = batch.read_cases(args.input, args.out, points_folder=args.points)
    shard_spec = batch.parse_shard(args.shard) if args.shard else None
    if shard_spec is not None:
        cases = batch.shard(cases, *shard_spec)
    results_path = Path(args.results) if args.results else batch.default_results_path(args.out, shard_spec)
    check_writable(results_path, what="--results file")
    batch.prepare_output_folder(args.out)
    if not cases:
        print(f"batch: shard {args.shard} holds none of the cases; nothing to do.", file=sys.stderr)
        return 0
    _check_mode(args, {})
    progress = tqdm_progress(disable=args.quiet)
    print(f"batch: {len(cases)} cases -> {args.out}" + (f" (shard {args.shard})" if args.shard else ""),
          file=sys.stderr, flush=True)
    try:
        if args.cluster:
            from .cluster import ray_batch

            spec = ray_batch.WorkerSpec(args.model, args.device, args.runtime, args.precision, settings)
            timings: dict = {}
            rows = ray_batch.run(cases, args.out, spec, address=args.cluster, workers=args.workers,
                                 cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                                 retries=args.retries, results_path=results_path, progress=progress, timings=timings)
            print(f"ray: cluster {timings.get('start_s', 0):.1f} s, workers ready after {timings.get('ready_s', 0):.1f} s; "
                  f"per case {1000 * timings.get('in_ray_s', 0):.0f} ms in Ray beyond the workers' own time",
                  file=sys.stderr)
        else:
            worker = batch.Worker.load(args.model, args.device, args.runtime, args.precision, settings)
            rows = batch.run(worker, cases, args.out, results_path, progress)
    except KeyboardInterrupt:
        print(f"cancelled; the finished cases are written and {results_path} lists them (run the same command "
              "again to do the rest).", file=sys.stderr)
        return EXIT_CANCELLED
    for row in rows:
        if row["status"] == "failed":
            print(f"failed: {row['case']}: {row['error']}", file=sys.stderr)
    print(batch.summary_line(rows, time.perf_counter() - t0, results_path))
    return EXIT_CASES_FAILED if any(r["status"] == "failed" for r in rows) else 0


def write_audit(path, result, vol) -> Path:
    """The prompt audit as one Slicer point list; each point's description says kept/rejected/borrowed, or
    correction (foreground or background) for the user's corrections."""
    lps = volume.ijk_to_physical(np.array([e.ijk(result.axis) for e in result.audit]), vol.ijk_to_lps)
    names = [f"{e.status[0].upper()}{i}" for i, e in enumerate(result.audit)]
    status = {"correction": lambda e: f"correction, {'foreground' if e.label else 'background'}"}
    descriptions = [f"{status.get(e.status, lambda e: e.status)(e)} (clicked on slice {e.source_slice}, saliency "
                    f"{e.score:.2f})" for e in result.audit]
    return prompts.write_markups(path, lps, names=names, descriptions=descriptions, node_name="SPD prompt audit")


def spd_model_title(path) -> str:
    """What a bundled SPD model is, from its header: backbone, training data and views, measured Dice."""
    from .core import spd_model

    if not path.exists():
        return "SPD model (file missing: reinstall SPDSegment)"
    header = spd_model.read_header(path)
    training = header.get("training", {})
    title = (f"SPD model on {header.get('backbone')}, trained on {training.get('data', '?')} "
             f"({len(training.get('cases', []))} cases; views: {', '.join(header.get('views', [])) or '?'})")
    dice = header.get("evaluation", {}).get("dice", {}).get("moderate")
    return title + (f"; test Dice {dice:.2f} at moderate noise" if dice is not None else "")


def cmd_models(args) -> int:
    print(f"{'name':16} {'available':10} {'input':6} title")
    for name, path in BUNDLED_SPD_MODELS.items():  # the SPD models first: the default is one of them
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:16} {'yes' if path.exists() else 'missing':10} {'':6} {spd_model_title(path)}{default}")
    manual = []
    for name, entry in catalogue().items():
        state = "yes" if is_available(name) else "download" if downloadable(name) else "by hand"
        print(f"{name:16} {state:10} {entry['input_size']:<6} {entry['title']} (raw mode)")
        if state == "by hand":
            manual.append(name)
        if args.verbose:
            print(f"{'':16} licence: {entry['licence']}; file: {cached_path(name)}")
    for name in manual:
        print(manual_download_message(name))
    print(f"The default model is {DEFAULT_MODEL}; --model also takes a .spd.safetensors file or a SAM-family "
          ".pth checkpoint.")
    return 0


def cmd_demo(args) -> int:
    """Raw-prompt SAM and SPD on the bundled sample case; Dice against its label; PNG overlay."""
    from .research.evaluate import dice_score, overlay_png

    case = sample_case()
    out_dir = Path(args.out_dir)
    outputs = {"segmentation": out_dir / "demo_spd.seg.nrrd", "overlay": out_dir / "demo_overlay.png"}
    note = ""
    if importlib.util.find_spec("matplotlib") is None:  # it comes with the "train" extra, not with SPDSegment
        del outputs["overlay"]
        note = " (no overlay PNG: matplotlib is not installed)"
    check_folder_writable(out_dir, "--out-dir folder")
    check_not_inputs({f"demo {kind}": path for kind, path in outputs.items()}, [case.image, case.label, case.clicks])
    vol = volume.read(case.image)
    check_space({out_dir: 200_000})  # the overlay PNG is about 100 KB
    label = volume.read_label(case.label, like=vol)
    points = prompts.to_voxels(prompts.read(case.clicks), vol, axis=case.axis)
    rows = []
    masks = {}
    progress = encoding_progress()
    for title, model_name, options in (
        ("SAM (LiteMedSAM), raw points", DEFAULT_BACKBONE, SegmentOptions(mode="raw", use_box=False)),
        ("SAM (LiteMedSAM), box around raw points", DEFAULT_BACKBONE, SegmentOptions(mode="raw", use_box=True)),
        ("SPD", args.model, SegmentOptions(mode="spd")),
    ):
        t0 = time.perf_counter()
        print(f"{title}: loading {model_name} ...", file=sys.stderr, flush=True)
        converted = conversions()
        model = load_model(model_name, device=args.device, runtime=args.runtime, precision=args.precision)
        note = load_note(time.perf_counter() - t0, conversions() - converted)
        if note:
            print(note, file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = segment(vol, points, model, options, progress=progress)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        seconds = time.perf_counter() - t0
        masks[title] = result.mask
        rows.append((title, dice_score(result.mask, label), seconds))
    with OutputSet() as files:  # both appear together, or neither
        volume.write_segmentation(files.add(outputs["segmentation"]), masks["SPD"], vol.ijk_to_lps,
                                  segment_name="hippocampus")
        if "overlay" in outputs:
            overlay_png(files.add(outputs["overlay"]), vol, label, masks, points, axis=case.axis)
        written = files.paths
    print(f"sample case {case.name}, {len(points)} sloppy centerline points (moderate noise)")
    for title, dice, seconds in rows:
        print(f"  {title:42s} Dice {dice:.3f}   {seconds:5.1f} s")
    print("wrote " + " and ".join(str(p) for p in written) + note)
    return 0


def conversions() -> int:
    """Networks converted to OpenVINO by this process so far (0 where OpenVINO is not installed)."""
    try:
        from .core.models import openvino_runtime
    except ImportError:
        return 0
    return openvino_runtime.conversions()


def load_note(seconds: float, converted: int) -> str:
    """The line ``spd demo`` prints after a slow model load: whether it converted the model or reused it."""
    if converted:
        return (f"  loaded in {seconds:.0f} s: converted for this machine on its first use (OpenVINO); later runs "
                "reuse the converted model")
    return f"  loaded in {seconds:.0f} s" if seconds > 2 else ""


def encoding_progress(stream=None):
    """A Progress printing each encoded slice with the time so far and the expected total (stderr).

    On a terminal one line is rewritten per slice; in a log, a line at the start, every quarter and the end.
    """
    state = {}

    def callback(stage: str, done: int, total: int) -> None:
        if stage != "encode" or total <= 0:
            return
        out = stream or sys.stderr
        now = time.perf_counter()
        if done == 0 or "start" not in state:
            state.update(start=now, printed=-1)
        elapsed = now - state["start"]
        if done == 0:
            message = f"  encoding {total} slices (the first slice shows the expected total time) ..."
        else:
            expected = elapsed / done * total
            message = (f"  encoded slice {done}/{total}: {elapsed:.1f} s so far, about {expected:.1f} s in all"
                       if done < total else f"  encoded {total} slices in {elapsed:.1f} s")
        tty = hasattr(out, "isatty") and out.isatty()
        quarter = 4 * done // total
        if tty:
            print("\r" + message.ljust(78), end="\n" if done >= total else "", file=out, flush=True)
        elif done in (0, 1, total) or quarter != state["printed"]:
            print(message, file=out, flush=True)
        state["printed"] = quarter

    return Progress(callback)


def _check_simulate(args) -> None:
    """The simulate options, checked before anything is read."""
    problem = output_type_error(args.out, (".mrk.json", ".json", ".csv"), "--out file")
    if problem:
        raise InputError(problem)
    check_writable(args.out, what="--out file")
    check_not_inputs({"--out file": args.out}, [args.label, args.image, args.points, args.result])
    if args.result and args.corrections:
        raise InputError("--result adds one correction against a result you made; --corrections N makes the results "
                         "itself (with --image and --model). Give one of them.")
    if args.corrections < 0:
        raise InputError(f"--corrections is {args.corrections}; give how many correction clicks to add, e.g. 5.")
    if args.corrections and not args.image:
        raise InputError("--corrections N segments the image after each click: give the image with --image.")
    if args.axis is not None and args.axis not in (0, 1, 2):
        raise InputError(f"--axis {args.axis} is not an array axis; use 0 (k), 1 (j) or 2 (i).")


def cmd_simulate(args) -> int:
    """Sloppy clicks from a label, and optionally the correction clicks of the CVPR 2025 interactive
    challenge's rule against a result (``--result``) or against SPD's results one at a time (``--corrections``)."""
    from .research.metrics import dice_score
    from .research.simulate import next_correction, with_correction

    _check_simulate(args)
    grid = volume.read(args.image) if args.image else volume.read(args.label)
    mask = volume.read_label(args.label, like=grid) if args.image else (grid.array > 0).astype("uint8")
    descriptions = None
    if args.points:
        clicks = prompts.to_voxels(prompts.read(args.points), grid, axis=args.axis)
        what = f"{len(clicks)} clicks from {Path(args.points).name}"
    else:
        sim = simulate(mask, args.axis or 0, args.level, seed=args.seed)
        clicks = sim.voxel_prompts(grid)
        descriptions = [str(k) for k in sim.kind]  # centerline, drift, spurious: clicks when read back
        what = f"{args.level}: {len(sim.ijk)} clicks ({int(sim.inside.sum())} inside the label)"
    added = []
    if args.result:
        click = next_correction(mask, volume.read_label(args.result, like=grid), clicks.axis)
        if click is not None:
            clicks = with_correction(clicks, click)
            added.append(click)
    if args.corrections:
        model = load_model(args.model, device=args.device)
        scores = []
        for step in range(args.corrections + 1):
            result = segment(grid, clicks, model).mask
            scores.append(dice_score(result, mask))
            click = next_correction(mask, result, clicks.axis) if step < args.corrections else None
            if click is not None:
                clicks = with_correction(clicks, click)
                added.append(click)
        print("Dice after 0.." + f"{args.corrections} corrections: " + " ".join(f"{d:.3f}" for d in scores))
    if descriptions is not None:
        descriptions += [c.kind for c in added]
    lps = volume.ijk_to_physical(clicks.ijk, grid.ijk_to_lps)
    points = prompts.from_lps(lps, labels=clicks.labels, names=clicks.names, source=args.out, kinds=clicks.kinds)
    if descriptions is not None and str(args.out).lower().endswith(".json"):
        prompts.write_markups(args.out, lps, names=points.names, descriptions=descriptions, color=(0.4, 1.0, 1.0),
                              node_name="simulated clicks", locked=False)
    else:
        prompts.write_points(args.out, points, node_name="simulated clicks")
    corrections = ", ".join(f"{'foreground' if c.label else 'background'} on slice {c.slice}" for c in added)
    print(f"{what}" + (f" + {len(added)} correction{'s' if len(added) > 1 else ''} ({corrections})" if added else "")
          + f" -> {args.out}")
    return 0


def cmd_train(args) -> int:
    from .research.train import TrainConfig, train

    settings = {name: getattr(args, name) for name in TRAIN_OPTIONS if hasattr(args, name)}
    if settings.get("axes") == ["all"]:
        settings["axes"] = (0, 1, 2)
    elif "axes" in settings:
        settings["axes"] = tuple(int(a) for a in settings["axes"])
    config = TrainConfig(data=args.data, out=args.out, dataset=args.dataset, cases=args.cases, **settings)
    t0 = time.perf_counter()
    out = train(config, progress=tqdm_progress())
    print(f"trained in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


# ``spd train`` options: the TrainConfig field, its help; defaults come from TrainConfig (their one home).
DEVICE_HELP = "auto, cpu, cuda (cuda:N for the N-th GPU) or mps"  # what registry.check_device accepts

TRAIN_OPTIONS = {
    "axes": "slicing axes to train on: array axes 0 1 2, or all (every view a reader may click in)",
    "modality": "intensity scaling: auto, mr or ct",
    "backbone": "catalogue backbone to train on",
    "mode": "frozen: encoder features computed once into the feature store (CPU); lora: adapters in the encoder (GPU)",
    "lora_rank": "rank of the LoRA adapters (--mode lora)",
    "head": "saliency head: context (2.5D, upsampling, pixel refinement) or conv2 (the first design)",
    "head_hidden": "channels of the saliency head",
    "head_blocks": "residual blocks of the context head",
    "head_context": "neighbour slices on each side the context head reads",
    "head_image": "the context head refines with the slice's pixels",
    "head_upsample": "2x steps of the context head's output above the embedding's resolution",
    "stage1_epochs": "passes over the training slices in stage 1 (saliency head)",
    "stage1_max_steps": "at most this many stage-1 steps",
    "stage1_batch": "slices per stage-1 step",
    "stage1_lr": "stage-1 learning rate (AdamW, warm-up then cosine)",
    "stage2_steps": "steps of stage 2 (decoder tuning); 0 keeps the backbone's decoder",
    "stage2_lr": "stage-2 learning rate (AdamW)",
    "batch_size": "stage 2: pairs of adjacent slices per step",
    "psc_weight": "weight of the Pairwise Slice Consistency loss",
    "prompt_mode": "stage-2 prompts: spd (consensus prompts) or raw (the noisy clicks; the SAM-Tuning baseline)",
    "local_only": "ablation: no borrowing from neighbour slices",
    "decoder_prompt": "what the decoder is given in stage 2 and at inference: points+box, or box (the points "
                      "choose the saliency component and the slices)",
    "fusion": "weight of the saliency map averaged with the decoder's probability at inference (0 to 1)",
    "components": "inference keeps all 3D parts of the mask, or only the clicked ones",
    "dense_prior": "also feed the saliency logits to the decoder as SAM's dense mask prompt",
    "tau": "saliency threshold recorded in the model",
    "neighbours": "neighbour slices n recorded in the model",
    "prompt_seeds": "simulated readers per case, axis and noise level",
    "seed": "random seed (training is deterministic given it)",
    "device": DEVICE_HELP,
    "cache_dir": "feature store folder (frozen mode; None: SPDSEGMENT_CACHE or ~/.cache/spdsegment, /features)",
    "work_dir": "stage checkpoints (None: OUT.work)",
    "resume": "continue a stopped run with the same settings and cases from its stage-1 checkpoint",
    "keep_work": "keep the work folder after success",
}


def add_train_options(parser) -> None:
    """One option per TRAIN_OPTIONS entry, typed and defaulted from TrainConfig (an option not given is
    absent from the parsed arguments, so TrainConfig's default applies)."""
    import argparse
    import dataclasses

    from .core.pipeline import COMPONENTS, DECODER_PROMPTS
    from .research.train import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    choices = {"modality": ["auto", "mr", "ct"], "mode": ["frozen", "lora"], "head": ["context", "conv2"],
               "prompt_mode": ["spd", "raw"], "decoder_prompt": list(DECODER_PROMPTS),
               "components": list(COMPONENTS)}
    for name, text in TRAIN_OPTIONS.items():
        default = fields[name].default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        common = dict(default=argparse.SUPPRESS, help=text if default is None else f"{text} (default: {shown})")
        flag = "--" + name.replace("_", "-")
        if name == "axes":
            parser.add_argument(flag, nargs="+", **common)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif name in choices:
            parser.add_argument(flag, choices=choices[name], **common)
        else:
            parser.add_argument(flag, type=type(default) if default is not None else str, **common)


def cmd_evaluate(args) -> int:
    from .research.evaluate import CORRECTION_REPORTS, REPORTS

    if args.corrections < 0:
        raise InputError(f"--corrections is {args.corrections}; give the number of correction clicks per case (for "
                         "example 5), or 0 for the usual benchmark.")
    levels = args.levels or []
    unknown = [level for level in levels if level not in LEVELS]
    if unknown:
        raise InputError(f"Unknown noise level {unknown[0]!r} (option --levels); choose from {', '.join(LEVELS)}.")
    if not args.corrections and not args.models_dir:
        raise InputError("--models-dir is needed for the benchmark (it holds DATASET_spd.spd.safetensors and the "
                         "baselines' models); the correction benchmark (--corrections N) uses the bundled models "
                         "without it.")
    out_dir = Path(args.out_dir)
    check_folder_writable(out_dir, "--out-dir folder")
    reports = CORRECTION_REPORTS if args.corrections else REPORTS
    check_not_inputs({f"report {out_dir / name}": out_dir / name for name in reports}, args.merge)
    check_space({out_dir: 1_000_000})  # the reports and the plot
    if args.cache_dir:
        check_writable(Path(args.cache_dir) / "probe", what="--cache-dir folder")
    if args.corrections:
        from .research.evaluate import run_correction_benchmark

        run_correction_benchmark(args)
        return 0
    from .research.evaluate import run_benchmark

    args.levels = levels or ["clean", "mild", "moderate", "severe"]
    run_benchmark(args)
    return 0


def cmd_bench_speed(args) -> int:
    from .research.speed import run_speed_benchmark

    run_speed_benchmark(args)
    return 0


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"],
                   help="inference engine; auto: OpenVINO on a CPU when installed, else PyTorch")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                   help="auto: bf16 with OpenVINO on a CPU with native bf16, else fp32; int8 (OpenVINO + "
                        "NNCF): the encoder's fully connected layers in int8 (docs/performance.md)")


def _segment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"SPD model ({DEFAULT_MODEL} or a .spd.safetensors file) or a backbone for raw mode "
                        "(litemedsam, sam_vit_b, ..., or a .pth checkpoint)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--mode", default="auto", choices=["auto", "spd", "raw"])
    p.add_argument("--axis", default=None, help="slicing axis: auto (default: from the clicks, the summary says "
                                                "which and why), axial, coronal, sagittal, 0, 1, 2")
    p.add_argument("--tau", type=float, default=None,
                   help=f"saliency threshold (default: the model's, usually {DEFAULT_TAU})")
    p.add_argument("--neighbours", type=int, default=None,
                   help=f"neighbour slices n (default: the model's, usually {DEFAULT_NEIGHBOURS})")
    p.add_argument("--no-box", action="store_true", help="raw mode: points only, no box around them")
    p.add_argument("--empty-slice", default="saliency", choices=["skip", "saliency"],
                   help="SPD: a slice left without prompts is decoded from its saliency box or skipped")
    p.add_argument("--slice-range", type=int, nargs=2, metavar=("FIRST", "LAST"))
    p.add_argument("--modality", default="auto", choices=["auto", "mr", "ct"])
    p.add_argument("--window", default=None, help="CT window: preset (soft_tissue, abdomen, lung, bone, brain) "
                                                  "or LEVEL,WIDTH")
    p.add_argument("--batch-size", type=int, default=None, help="slices per encoder/decoder call "
                                                                  "(default: 1 on a CPU, 16 on a GPU)")
    add_runtime_arguments(p)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except an unset (None) one: "(default: None)" tells nothing."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment a volume from point prompts")
    p.add_argument("image", help="NIfTI, NRRD, MHA file or DICOM folder")
    p.add_argument("--points", required=True, help="Slicer .mrk.json (point list or curve) or CSV")
    p.add_argument("--out", help="output .seg.nrrd (default IMAGE_spd.seg.nrrd)")
    p.add_argument("--label-out", help="also write a label map (.nii.gz, .nrrd)")
    p.add_argument("--saliency-out", help="SPD: write the saliency map volume (.nii.gz, .nrrd)")
    p.add_argument("--audit-out", help="SPD: write kept/rejected/borrowed prompts as .mrk.json")
    p.add_argument("--segment-name", help="name of the segment in the .seg.nrrd (default: SPD, or SAM in raw mode)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--strict", action="store_true",
                   help=f"treat an implausible result (blank image, no voxels, every click rejected, an unchecked "
                        f"model file, an accepted DICOM gap) as a failure: exit {EXIT_IMPLAUSIBLE} and write nothing")
    p.add_argument("--allow-slice-gaps", action="store_true",
                   help="read a DICOM series with missing or unevenly spaced slices as evenly spaced (with a "
                        "warning; refused without this option)")
    _segment_arguments(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("batch", help="segment many cases (a folder or a CSV manifest), resumable, optionally on a "
                                     "Ray cluster", formatter_class=DefaultsHelp)
    p.add_argument("input", help="a folder (MSD/nnU-Net: imagesTr/ or images/ with points/; or images with their "
                                 "CASE.mrk.json beside them) or a CSV manifest (image,points[,case,output,tau,...])")
    p.add_argument("--out", required=True, help="output folder: CASE_spd.seg.nrrd, CASE_spd.provenance.json and "
                                                "results.csv")
    p.add_argument("--points", help="the folder of the point files (default: points/ beside imagesTr/, or the "
                                    "image folder)")
    p.add_argument("--results", help="the results CSV (default: OUT/results.csv, per shard "
                                     "OUT/results-shard-I-of-N.csv)")
    p.add_argument("--shard", help="I/N: only the cases of shard I of N (0 <= I < N; by a hash of the case name), "
                                   "for job arrays")
    p.add_argument("--segment-name", help="name of the segment in each .seg.nrrd (default: the case name)")
    p.add_argument("--strict", action="store_true", help="an implausible result fails its case (nothing written "
                                                         "for it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--cluster", help="run on Ray (pip install 'spdsegment[cluster]'): auto (a running cluster, "
                                     "else a local one), local, or the cluster's address")
    p.add_argument("--workers", type=int, help="--cluster: number of workers (default: one per GPU, else one per "
                                               "--cpus-per-worker cores)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="--cluster: CPU cores each worker reserves")
    p.add_argument("--gpus-per-worker", type=float, help="--cluster: GPUs each worker reserves (default: 1 when "
                                                         "the cluster has GPUs)")
    p.add_argument("--retries", type=int, default=2, help="--cluster: how often a case whose worker died is "
                                                          "tried again")
    _segment_arguments(p)
    p.set_defaults(func=cmd_batch, saliency_out=None)

    p = sub.add_parser("models", help="list the model catalogue and what is on this machine")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="run on the bundled sample case and print Dice",
                       formatter_class=DefaultsHelp)
    p.add_argument("--model", default=DEFAULT_MODEL, help="SPD model name or .spd.safetensors file")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out-dir", default="spd_demo", help="where the segmentation and the overlay PNG go")
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="sloppy centerline clicks from a label, and correction clicks (.mrk.json, "
                                        ".csv)", formatter_class=DefaultsHelp)
    p.add_argument("label", help="label map (.nii.gz, .nrrd); every voxel above 0 is the structure")
    p.add_argument("--axis", type=int, default=None,
                   help="array axis the clicks follow (0 = k, 1 = j, 2 = i); None: 0 for simulated clicks, the "
                        "clicks' own with --points")
    p.add_argument("--level", default="moderate", choices=list(LEVELS),
                   help="how sloppy the clicks are (docs/noise_model.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated reader (same seed, same clicks)")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS,
                   help="output point list: .mrk.json (kinds in the descriptions) or .csv")
    p.add_argument("--points", help="start from these clicks (.mrk.json or .csv, corrections included) instead of "
                                    "simulating sloppy ones")
    p.add_argument("--result", help="add the next correction click against this result (segmentation or label map "
                                    "on the label's grid): the CVPR 2025 interactive challenge's rule")
    p.add_argument("--corrections", type=int, default=0,
                   help="segment --image with --model and add this many correction clicks, one against each result")
    p.add_argument("--image", help="the image of the label (needed with --corrections)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model that segments with --corrections")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_simulate)

    defaults = DefaultsHelp
    p = sub.add_parser("train", help="train an SPD model on an MSD/nnU-Net folder (imagesTr, labelsTr)",
                       formatter_class=defaults)
    p.add_argument("--data", required=True, help="MSD / nnU-Net folder with imagesTr/ and labelsTr/")
    p.add_argument("--out", required=True, help="output .spd.safetensors")
    p.add_argument("--dataset", help="use the fixed split of a benchmark dataset (hippocampus, left_atrium)")
    p.add_argument("--cases", nargs="*", help="case names (default: the split's train_full cases with --dataset, else every case)")
    add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="the benchmark: SPD against SAM baselines on the fixed splits",
                       formatter_class=defaults)
    p.add_argument("--data-root", default="../shared/data", help="folder holding one folder per dataset")
    p.add_argument("--datasets", nargs="*", default=["hippocampus", "left_atrium"], help="datasets to evaluate")
    p.add_argument("--levels", nargs="*", default=None,
                   help="click noise levels (docs/noise_model.md; default: clean mild moderate severe, with "
                        "--corrections: moderate severe harsh)")
    p.add_argument("--models-dir",
                   help="folder with DATASET_spd.spd.safetensors, DATASET_samtune.spd.safetensors, DATASET_unet.pt "
                        "and lever models DATASET_NAME.spd.safetensors (needed but with --corrections, which uses the "
                        "bundled SPD model when the folder has none)")
    p.add_argument("--corrections", type=int, default=0,
                   help="the correction benchmark instead: N correction clicks per case by the CVPR 2025 interactive "
                        "challenge's rule after the sloppy clicks, SPD and raw LiteMedSAM (docs/benchmarks.md)")
    p.add_argument("--cache-dir", help="--corrections: keep the encoded slices in this folder too, so a second run "
                                       "encodes nothing (about 2 MB per slice)")
    p.add_argument("--store", help="feature store of the test cases (scripts/encode_features.py; None: the user "
                                   "cache's)")
    p.add_argument("--out-dir", default="benchmark", help="where results.md, per_case.csv and the plot go")
    p.add_argument("--views", default="all", choices=["main", "all"],
                   help="main: the split's slicing axis only; all: also the two other views (moderate noise)")
    p.add_argument("--no-ladder", action="store_true", help="skip the oracle ladder")
    p.add_argument("--max-cases", type=int, default=0, help="only the first N test cases (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the click simulator")
    p.add_argument("--merge", nargs="*", default=[], help="per_case.csv files of earlier runs to report with")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench-speed", help="naive slice-by-slice SAM against the project's path",
                       formatter_class=defaults)
    p.add_argument("--data-root", default="../shared/data", help="folder holding one folder per dataset")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--model", default=DEFAULT_MODEL, help="SPD model name or .spd.safetensors file")
    p.add_argument("--preview-only", action="store_true",
                   help="only the effect's Preview, through the engine process and in-process")
    p.add_argument("--seconds-per-click", type=float, default=1.0,
                   help="the pace of the simulated clicks in the Preview columns (slower on a busy machine)")
    p.add_argument("--corrections-only", action="store_true",
                   help="only the correction latency: a correction click to the updated Preview, through the engine")
    p.add_argument("--correction-clicks", type=int, default=3, help="correction clicks timed per case")
    p.add_argument("--busy", type=int, default=0,
                   help="keep this many other processes spinning on the CPU while timing (2: both cores of this "
                        "machine busy, as Slicer's rendering or another job would; the correction rows only while "
                        "their corrections are timed, after the first Preview)")
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_bench_speed)
    return parser


# the option of each setting that core errors name (SPDError.setting): the command line's own hint
OPTION_OF_SETTING = {"runtime": "--runtime", "precision": "--precision", "device": "--device", "model": "--model",
                     "tau": "--tau", "neighbours": "--neighbours", "batch_size": "--batch-size",
                     "slice_range": "--slice-range", "window": "--window", "modality": "--modality",
                     "mode": "--mode", "empty_slice": "--empty-slice", "allow_slice_gaps": "--allow-slice-gaps",
                     "out": "--out", "shard": "--shard", "cluster": "--cluster", "points": "--points",
                     "output": "--out"}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """SPD's warnings (errors.SPDWarning) as one ``warning: ...`` line; others as Python shows them."""
    if issubclass(category, SPDWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def option_of(setting: Optional[str], command: str) -> Optional[str]:
    """The option that sets a core setting (SPDError.setting) in this command, or None."""
    if command == "train" and setting in TRAIN_OPTIONS:  # spd train's options are TrainConfig's fields
        return "--" + setting.replace("_", "-")
    return OPTION_OF_SETTING.get(setting)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)  # every command: an unknown device is refused before anything loads
        with warnings.catch_warnings():
            warnings.simplefilter("always", SPDWarning)
            warnings.showwarning = _show_warning
            return args.func(args)
    except SPDError as exc:
        option = option_of(exc.setting, args.command)
        print(f"error: {exc}" + (f" (option {option})" if option else ""), file=sys.stderr)
        return EXIT_INPUT
    except MemoryError:
        print("error: out of memory. Segment a smaller slice range (--slice-range), lower --batch-size, or use "
              "a machine with more memory; nothing was written.", file=sys.stderr)
        return EXIT_MEMORY
    except KeyboardInterrupt:
        print("cancelled; nothing was written.", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
