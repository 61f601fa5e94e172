"""fewstep.export: turns a diffusers folder or single-file checkpoint into a model package.

    export_package(src, out, dtype="fp32", opset=18, config=None) -> Path

Files, one concept each: `source.py` (checking and loading the source, pickle refusal),
`graphs.py` (each graph's ONNX contract and wrapper module), `onnx_io.py` (torch -> ONNX,
external data), `verify.py` (onnxruntime against torch), `progress.py` (stage display),
`package_writer.py` (`export_package`: the whole lifecycle, atomically).
"""

from fewstep.export.package_writer import DTYPES, export_package
from fewstep.export.verify import VerificationError

__all__ = ["DTYPES", "VerificationError", "export_package"]
