"""Engine adapters (one package per engine) and the machinery they share: engines, patches, enabling."""
