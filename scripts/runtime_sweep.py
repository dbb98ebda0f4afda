"""The LiteMedSAM encoder on this CPU with each inference engine / precision: seconds per slice and
the relative error of the embeddings against eager PyTorch fp32 (what docs/performance.md cites).

    python scripts/runtime_sweep.py [--compile] [--onnxruntime] [--int8]

Always measured: eager PyTorch fp32 (channels-last) and bf16 autocast, OpenVINO fp32 and bf16 (the
project's runtime). Optional, each needing its own package: --compile (torch.compile, inductor),
--onnxruntime (pip install onnxruntime onnx), --int8 (OpenVINO + NNCF post-training int8, calibrated
on slices of the sample case; pip install nncf). Batch 1, the CPU default.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import torch

from SPDSegmentLib.core.models.registry import load_backbone
from SPDSegmentLib.core.sample import sample_case
from SPDSegmentLib.core.volume import apply_range, get_slice, intensity_range, read



def seconds_per_call(function, x, repeats: int = 8) -> float:
    for _ in range(2):
        function(x)
    t0 = time.perf_counter()
    for _ in range(repeats):
        function(x)
    return (time.perf_counter() - t0) / repeats


def openvino_request(xml_or_model, precision: str):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(xml_or_model) if isinstance(xml_or_model, str) else xml_or_model
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x.numpy()})[0].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--onnxruntime", action="store_true")
    parser.add_argument("--int8", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    backbone = load_backbone("litemedsam", device="cpu")  # channels-last on the CPU
    encoder = backbone.image_encoder
    volume = read(sample_case().image)
    lo_hi = intensity_range(volume.array)
    slices = [backbone.prepare([apply_range(get_slice(volume.array, 1, t), *lo_hi)]) for t in range(5, 40, 3)]
    x = slices[len(slices) // 2]
    with torch.inference_mode():
        reference = [encoder(s.contiguous(memory_format=torch.channels_last)).numpy() for s in slices[:4]]

    def error(function) -> float:
        with torch.inference_mode():
            out = [np.asarray(function(s)) for s in slices[:4]]
        return float(np.mean([np.linalg.norm(o - r) / np.linalg.norm(r) for o, r in zip(out, reference)]))

    rows = []

    def eager(s):
        return encoder(s.contiguous(memory_format=torch.channels_last)).numpy()

    def eager_bf16(s):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(s.contiguous(memory_format=torch.channels_last)).float().numpy()

    with torch.inference_mode():
        rows.append(("PyTorch eager fp32", seconds_per_call(eager, x), 0.0))
        rows.append(("PyTorch eager bf16 autocast", seconds_per_call(eager_bf16, x), error(eager_bf16)))
        if args.compile:
            compiled = torch.compile(encoder)
            t0 = time.perf_counter()
            compiled(x.contiguous(memory_format=torch.channels_last))
            first = time.perf_counter() - t0

            def run_compiled(s):
                return compiled(s.contiguous(memory_format=torch.channels_last)).numpy()

            rows.append((f"torch.compile fp32 (first call {first:.0f} s)", seconds_per_call(run_compiled, x),
                         error(run_compiled)))
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "encoder.xml")
        ov.save_model(ov.convert_model(encoder, example_input=x, input=[tuple(x.shape)]), xml, compress_to_fp16=False)
        for precision in ("f32", "bf16"):
            request = openvino_request(xml, precision)
            rows.append((f"OpenVINO {precision}", seconds_per_call(request, x), error(request)))
        if args.onnxruntime:
            import onnxruntime as ort

            onnx_path = os.path.join(tmp, "encoder.onnx")
            torch.onnx.export(encoder, (x,), onnx_path, opset_version=17, dynamo=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])

            def run_ort(s):
                return session.run(None, {session.get_inputs()[0].name: s.numpy()})[0]

            rows.append(("ONNX Runtime fp32", seconds_per_call(run_ort, x), error(run_ort)))
        if args.int8:
            import nncf

            quantised = nncf.quantize(ov.Core().read_model(xml), nncf.Dataset([s.numpy() for s in slices]),
                                      model_type=nncf.ModelType.TRANSFORMER, subset_size=len(slices))
            request = openvino_request(quantised, "f32")
            rows.append(("OpenVINO int8 (NNCF, calibrated)", seconds_per_call(request, x), error(request)))
    print(f"LiteMedSAM encoder, batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"OpenVINO {ov.__version__.split('-')[0]}")
    print(f"{'engine':45} {'s/slice':>8} {'slices/s':>9} {'rel. error':>10}")
    for name, seconds, err in rows:
        print(f"{name:45} {seconds:8.3f} {1 / seconds:9.2f} {err:10.4f}")


if __name__ == "__main__":
    main()
