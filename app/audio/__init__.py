"""The audio path: decode uploads to 16 kHz samples, find speech (VAD), cut long recordings into chunks
and schedule them over this instance and its idle siblings."""
