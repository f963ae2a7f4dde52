//! Disk image formats: raw, qcow2 with backing files, import of vmdk/vdi/vhd/vhdx, conversion.
