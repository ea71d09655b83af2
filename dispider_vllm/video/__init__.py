"""Video utilities outside the model: synthetic test videos and frames (``synth``)."""
