"""Micro-benchmark behind docs/performance.md: LiteMedSAM encoder and decoder throughput on the CPU
by batch size, with and without the channels-last encoder.

Usage: python scripts/encoder_sweep.py   (with the project installed)
"""
import time

import torch

from SPDSegmentLib.core.models import load_backbone
from SPDSegmentLib.core.models.backbone import pad_points


def rate(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        done += batch
    return done / (time.perf_counter() - start)


def set_layout(backbone, channels_last: bool) -> None:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    backbone.image_encoder.to(memory_format=layout)
    backbone._channels_last = channels_last


def main() -> None:
    backbone = load_backbone("litemedsam", "cpu")
    one = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        # layouts interleaved over rounds, so that clock boost or a neighbour's load hits both alike
        for round_ in range(3):
            for channels_last in (True, False):
                set_layout(backbone, channels_last)
                speed = rate(lambda: backbone.encode(one), 1, 6)
                print(f"round {round_} encoder channels_last={channels_last} batch 1: {speed:.2f} slices/s")
        set_layout(backbone, True)
        for batch in (1, 2, 4, 8):
            images = torch.rand(batch, 3, 256, 256)
            speed = rate(lambda: backbone.encode(images), batch, 8)
            print(f"encoder channels_last=True batch {batch}: {speed:.2f} slices/s")
        for batch in (1, 4, 16):
            emb = torch.rand(1, 256, 64, 64).expand(batch, -1, -1, -1).contiguous()
            points, labels = pad_points([[[100.0, 100.0]]] * batch)
            boxes = torch.tensor([[50.0, 50.0, 150.0, 150.0]] * batch)
            speed = rate(lambda: backbone.decode(emb, points, labels, boxes), batch, 5)
            print(f"decoder batch {batch}: {speed:.1f} prompts/s")


if __name__ == "__main__":
    main()
