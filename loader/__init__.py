"""tritonmoe.loader"""
