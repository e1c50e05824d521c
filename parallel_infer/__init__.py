"""DualParal long-video inference (docs/design.md §3): block-wise denoising x a layer pipeline across ranks.

Entry points: `parallel_infer.api.render_video` (the app, the demo) and `scripts/render_videos.py` (torchrun
batches); both run each rank's life through `batch` (check, join, place, load, render). Data flow:
  config (settings) + topology (placement options, every rank's role) -> loader (--model DIR; wan22 for
  Wan2.2 folders) -> balance (rank 0 measures costs, layer_split splits) -> render (plan, per-rank Renderer)
  -> wan_adapter (embed / blocks / head; installs feature_cache on this rank's layers)
  + queue (schedule, rank 0's latents; initial noise from noise) -> layer_pipeline (this rank's layers;
  send/receive) -> block_writer (decode thread) -> stream (decode + MP4).
"""
