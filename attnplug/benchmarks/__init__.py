"""The GPU benchmarks behind ``attnplug bench`` (each module runs alone too: ``python -m attnplug.benchmarks.<name>``)."""
