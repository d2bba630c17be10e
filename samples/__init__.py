"""Generated sample archives: the demo's sample (``samples.sample``) and the far-from-pretraining
sample (``samples.far_sample``)."""
