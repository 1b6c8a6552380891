"""Engine-independent core: vectors, policies, the steering math, datasets, prompts."""
