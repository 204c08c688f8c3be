"""synthd: a headless real-time OSC/MIDI synthesis server for neural model files."""

__version__ = "0.1.0"
