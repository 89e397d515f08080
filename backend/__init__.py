"""tritonmoe.backend"""
