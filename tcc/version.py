"""tcc's version (tcc.__version__): a module of its own, so that the lower layers read it without
importing the tcc package's lazy attributes (compile, load, trace), which reach the driver."""
__version__ = "0.1.0"
