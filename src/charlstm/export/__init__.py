"""Taking a trained model where people already are: formats other tools can run without charlstm.

- `onnx`: one step of the network as an ONNX graph (character ids and the recurrent state in, logits
  and the new state out) with its vocabulary and sampling defaults in a JSON file beside it, for
  ONNX Runtime and any other ONNX runtime; `charlstm generate --engine onnx` generates through it.
- `web`: a static folder (index.html, the weights, the script) that generates in the browser with
  no server and no network.

`charlstm export RUN --format onnx|web --out DIR` calls one function per format. Both read a run
folder through `runs` and the model through `generate.textmodel`, and write only into DIR.
"""
