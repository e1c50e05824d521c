"""Decode latent blocks as they leave the queue and stream the frames into an MP4 file (and, when asked, into
one small video segment per block, for a player that shows the video as it grows).

With the Wan VAE, decoding is causal frame by frame: AutoencoderKLWan itself loops over latent frames
keeping per-conv caches in `_feat_map`. We run the same loop but keep that cache across blocks, so the
stream decodes exactly what one `vae.decode` of the whole video would, with memory bounded by one block.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch


class FrameDecoder:
    """Final latent blocks [1, C, f, h, w] -> uint8 frames [n, H, W, 3], in order."""

    def __init__(self, vae=None):
        self.vae = vae
        if vae is not None:
            z = vae.config.z_dim
            self.mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(vae.device)
            self.std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(vae.device)
            vae.clear_cache()
            self.first = True

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        video = latents if self.vae is None else self._vae_decode(latents)
        video = video.clamp(-1, 1)[0]  # [C, f, H, W]
        if video.shape[0] == 1:
            video = video.expand(3, -1, -1, -1)
        return ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        x = vae.post_quant_conv(latents.to(vae.device, vae.dtype) * self.std + self.mean)
        frames = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=self.first))
            self.first = False
        out = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out


def h264_writer(path: Path, fps: int, height: int, width: int, output_params: list[str]):
    """A started imageio-ffmpeg frame writer: H.264 (yuv420p) at the frame's own size. macro_block_size=1: no
    resizing to multiples of 16, so a 12x12 canvas stays 12x12 (every size a model renders is even, as 4:2:0 needs)."""
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec="libx264", quality=8,
        macro_block_size=1, output_params=output_params, ffmpeg_log_level="error",
    )
    writer.send(None)  # start ffmpeg
    return writer


class Mp4Stream:
    """Frames appended as they come; the file appears under `path` only once closed complete.

    `limit` drops frames past a wanted count (a layout that covers --seconds may be a little longer).
    """

    def __init__(self, path: str | Path, fps: int, height: int, width: int, limit: int | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.limit, self.written = limit, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = h264_writer(self.partial, fps, height, width, ["-movflags", "+faststart"])

    def write(self, frames: np.ndarray) -> np.ndarray:
        """Append `frames`; returns those kept (all but any past `limit`)."""
        if self.limit is not None:
            frames = frames[: max(0, self.limit - self.written)]
        for frame in frames:
            self.writer.send(np.ascontiguousarray(frame))
        self.written += len(frames)
        return frames

    def close(self) -> None:
        self.writer.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.writer.close()
        self.partial.unlink(missing_ok=True)


class SegmentWriter:
    """Each block's frames also as one self-contained video file, `folder/block-0000.ts`, ...: H.264 in MPEG-TS,
    the chunk a streaming `gr.Video` output takes (it copies the H.264 into its HLS playlist without re-encoding).
    Same encoder and size as the MP4 (h264_writer), but encoded on its own: the MP4 is not touched. A file
    appears under its name only once complete, then `on_segment(path, frames)` is called; a block with no frame
    left (all past the wanted length) writes none."""

    def __init__(self, folder: str | Path, fps: int, height: int, width: int,
                 on_segment: Callable[[Path, int], None] | None = None):
        self.folder, self.fps, self.height, self.width, self.on_segment = Path(folder), fps, height, width, on_segment
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, block: int, frames: np.ndarray) -> None:
        if not len(frames):
            return
        path = self.folder / f"block-{block:04d}.ts"
        partial = path.with_name(f".{path.stem}.partial.ts")
        writer = h264_writer(partial, self.fps, self.height, self.width, ["-f", "mpegts"])
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(partial, path)
        if self.on_segment is not None:
            self.on_segment(path, len(frames))
