"""The artifact format shared by the compiler (which writes it) and the device runtime (which reads it).

numpy + stdlib only: manifest validation and loading, safetensors, atomic writes, ONNX wire reading.
"""
