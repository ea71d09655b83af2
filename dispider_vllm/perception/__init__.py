"""Perception: frames -> 16-frame clips -> clip features (raw merged CLIP patches, memory M, indicator T).

``frames`` decodes, samples and preprocesses frames; ``clips`` and ``scenes`` group sampled frames into clips.
"""
