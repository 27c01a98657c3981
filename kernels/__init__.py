"""Triton kernels of semfid (installed as ``semfid.kernels``); imports only torch and triton."""
