"""tritonmoe.tools"""
