"""Indexed datasets: documents stored as scifm token ids in Megatron-Core's .bin/.idx format, written
once by `scifm data tokenize` and read by `data.sources` entries of kind "indexed".

files.py names the files and reads the sidecar, layout.py turns a document into stored ids and back,
packing_index.py is what packing reads of a document without reading it, write.py is the tokenize
command, stream.py reads a dataset as a resumable stream.
megatron-core is imported on first use, so scifm imports without it.
"""
