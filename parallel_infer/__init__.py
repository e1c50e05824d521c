"""DualParal long-video inference (DESIGN.md section 3): block-wise denoising x a layer pipeline across ranks.

Entry points: `parallel_infer.api.render_video` (the app, the demo) and `scripts/render_videos.py` (torchrun
batches). Data flows config -> loader -> wan_adapter + queue -> pipeline -> stream (decode + MP4).
"""
