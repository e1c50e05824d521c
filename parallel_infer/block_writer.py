"""Decode finished blocks and write their frames, on the denoising thread or beside it.

Inline, each block is decoded and written before denoising goes on: the decode sits on the critical path.
Threaded (the default), the decode rank hands each block to one worker thread that decodes and writes while
the layer pipeline denoises later blocks; on a GPU the worker runs the VAE on its own CUDA stream, after an
event that marks the latent ready on the denoising stream, so VAE kernels fill the gaps between the
transformer's. One thread touches the causal VAE cache, in block order, so the frames are exactly the inline
path's (and one `vae.decode` of the whole video's). A bounded queue holds at most QUEUED blocks: if decoding
falls behind, denoising waits instead of memory growing with the video. With a SegmentWriter, each block's
frames (as kept by the MP4) are also written as one small video segment, after the MP4 has them and before
`on_written` reports the block.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from parallel_infer.stream import FrameDecoder, Mp4Stream, SegmentWriter

QUEUED = 4  # blocks waiting for the decoder


class BlockWriter:
    """`put(block, latent)` in block order; `close()` returns the decode timings once the MP4 is complete."""

    def __init__(self, decoder: FrameDecoder, stream: Mp4Stream, threaded: bool = True,
                 on_written: Callable[[int], None] | None = None, segments: SegmentWriter | None = None):
        self.decoder, self.stream, self.on_written, self.segments = decoder, stream, on_written, segments
        self.busy = 0.0  # seconds spent decoding and writing
        self.error: BaseException | None = None
        self.thread = self.cuda_stream = None
        if threaded:
            self.blocks: queue.Queue = queue.Queue(QUEUED)
            device = decoder.vae.device if decoder.vae is not None else torch.device("cpu")
            if device.type == "cuda":
                self.cuda_stream = torch.cuda.Stream(device)
            self.thread = threading.Thread(target=self._work, args=(device,), name="block-writer", daemon=True)
            self.thread.start()

    def put(self, block: int, latent: torch.Tensor) -> None:
        if self.thread is None:
            return self._write(block, latent)
        if self.error is not None:
            raise RuntimeError(f"decoding failed: {self.error}") from self.error
        ready = None
        if latent.is_cuda and self.cuda_stream is not None:
            ready = torch.cuda.Event()
            ready.record()  # on the denoising stream, which produced the latent
            latent.record_stream(self.cuda_stream)  # the allocator must not reuse it before the decode stream is done
        self.blocks.put((block, latent, ready))

    def _write(self, block: int, latent: torch.Tensor) -> None:
        start = time.perf_counter()
        frames = self.stream.write(self.decoder.decode(latent))
        if self.segments is not None:
            self.segments.write(block, frames)
        self.busy += time.perf_counter() - start
        if self.on_written is not None:
            self.on_written(block)

    def _work(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        while (job := self.blocks.get()) is not None:
            if self.error is not None:
                continue  # drain, so put() never blocks on a dead worker
            block, latent, ready = job
            try:
                if ready is not None:
                    with torch.cuda.stream(self.cuda_stream):
                        self.cuda_stream.wait_event(ready)
                        self._write(block, latent)
                else:
                    self._write(block, latent)
            except BaseException as e:  # reported to the denoising thread by put() or close()
                self.error = e

    def _join(self) -> None:
        if self.thread is not None:
            self.blocks.put(None)
            self.thread.join()
            self.thread = None

    def close(self) -> dict:
        """Wait for the last block, close the MP4 (it appears complete under its name) and return
        {"decode_write": busy seconds, "decode_tail": seconds this call waited}."""
        start = time.perf_counter()
        self._join()
        if self.error is not None:
            self.stream.abort()
            raise RuntimeError(f"decoding failed: {self.error}") from self.error
        self.stream.close()
        return {"decode_write": self.busy, "decode_tail": time.perf_counter() - start}

    def abort(self) -> None:
        self._join()
        self.stream.abort()
