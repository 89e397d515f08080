"""tritonmoe.router"""
