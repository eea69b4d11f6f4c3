// Makes dlkern._C an importable Python module. Importing it loads this library, whose static initializers
// register the dlkern:: ops with the dispatcher; there are no Python-level functions here.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "dlkern's C++/CUDA ops, registered under torch.ops.dlkern",
      -1,    // size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}
