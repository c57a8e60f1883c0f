"""The toy attribute world: ProSpect's embedded model and the benchmark that scores it.

Nothing in the core library imports this package. It holds

- ``world``: the renderer (position, shape, colour, texture, background of one object) and captions;
- ``reader``: the analytic reader that reads those attributes back from an image;
- ``benchmark``: the attribute-transfer tasks, their scoring and bootstrap statistics;
- ``demo``: ``prospect demo``, the main job on the embedded model;
- ``recipe``: the code that trains the embedded model from scratch and measures it;
- ``model/``: the embedded model's weights (a diffusers folder) and its card.
"""
