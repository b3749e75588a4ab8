"""Megrez-3B-Omni's image path: its config, the vision weights, MiniCPM-V-style slicing and the prompt's
image placeholders. The LLM is Megrez-3B's; the vision tower and resampler are compiled beside it
(compile/vision.py) into the same library's `image_embed`."""
