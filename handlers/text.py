"""TorchServe handler for text requests: `{"text": ...}`, `{"texts": [...]}`, a text/plain body, or OIP v2 BYTES.

The archive ships its `tokenizer.json` (Hugging Face tokenizers) and a manifest naming the model's token inputs;
the runtime (AOTInductor, ONNX Runtime, ...) is whatever the archive was built with. TorchServe wants exactly one
class here.
"""

from handlers.base import TspackHandler


class TextHandler(TspackHandler):
    frontend_name = "text"
