/* Building a new program on the running one's maps (control/datapath.py):
 * with -include adopt.h -DXLB_PIN_DIR="dir", every table is declared pinned at
 * dir/<its name>, and bcc reuses the map pinned there (or creates and pins a
 * new one). Every bcc table macro (BPF_HASH, BPF_ARRAY, ...) expands through
 * BPF_TABLE, so redefining it covers them all. */
#undef BPF_TABLE
#define BPF_TABLE(_table_type, _key_type, _leaf_type, _name, _max_entries) \
	BPF_F_TABLE(_table_type ":" XLB_PIN_DIR "/" #_name, _key_type, _leaf_type, \
		    _name, _max_entries, 0)
