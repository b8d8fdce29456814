"""Write this node's RANK_TABLE_FILE (hccl_tools format) for the devices in --device_num.

Device IPs come from `hccn_tool -i N -ip -g`, else /etc/hccn.conf. The server id is --server_ip, else this host's
address (refused when it is a 127.x loopback address). Merge the per-node files of all nodes with `merge_hccl`."""

from __future__ import annotations

import logging

from qwenbuild.parallel import rank_table as rt

logger = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("--device_num", default="[0,8)", help='logical device range, "[0,8)" or "[0,8]" (quote it)')
    parser.add_argument("--visible_devices", default="0,1,2,3,4,5,6,7",
                        help="physical device id of each logical index (default 0,1,...,7)")
    parser.add_argument("--server_ip", default="", help="this node's cluster IP (default: resolve the host name)")
    parser.add_argument("--device_num_per_node", type=int, default=8, help="devices on this node (default 8)")
    parser.add_argument("--hccn_conf", default="/etc/hccn.conf", help="fallback file with address_N=IP lines")
    parser.add_argument("--output", default="", metavar="PATH",
                        help="where to write (default: ./hccl_<n>p_<ids>_<server_ip>.json)")


def main(args):
    devices = rt.physical_devices(rt.parse_device_range(args.device_num, args.device_num_per_node),
                                  rt.parse_visible_devices(args.visible_devices))
    server = rt.check_ip(args.server_ip, "--server_ip") if args.server_ip else rt.detect_server_ip()
    ips = [rt.discover_device_ip(d, args.hccn_conf) for d in devices]
    table = rt.node_rank_table(server, list(zip(devices, ips)))
    path = rt.write_rank_table(table, args.output or rt.node_file_name(table), inputs=[args.hccn_conf])
    logger.info(f"wrote {path}: {len(devices)} devices on server {server}")
    print(path)
