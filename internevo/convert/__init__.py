"""Conversion to and from other formats: Hugging Face (``hf`` state-dict mapping, ``hf_config``,
``safetensors_io``, ``tokenizer``, ``hf_folder``)."""
