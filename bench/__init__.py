"""pyhyve benchmarks: each prints pyhyve's figure beside a reference measured in the same run."""
