"""Expert models and their on-disk format: the image DiT, the video Wan model, the prompt encoder."""
