import GranaryMemory

/// Why a one-sided operation or a message could not be carried out.
///
/// Each case names the peer and the address or channel involved.
public enum TransportError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The node is not a peer of this transport (never added, or removed from the configuration).
    case unknownNode(NodeID)
    /// The peer has no such region, or its file could not be mapped.
    case unknownRegion(node: NodeID, region: RegionID, reason: String)
    /// The access falls outside the region.
    case outOfBounds(node: NodeID, address: GlobalAddress, length: Int, regionSize: Int)
    /// An atomic operation on an address that is not 8-byte aligned.
    case misaligned(node: NodeID, address: GlobalAddress, operation: String)
    /// The peer does not answer (a dead process, a retry-exceeded completion).
    case peerUnreachable(node: NodeID, detail: String)
    /// A message longer than the channel carries.
    case messageTooLarge(bytes: Int, maximum: Int)
    /// The receiver did not free space in its ring within the send timeout.
    case channelFull(receiver: NodeID, waitedMilliseconds: Int)
    /// A ring holds bytes that are not a well-formed message from the expected sender.
    case corruptChannel(sender: NodeID, receiver: NodeID, reason: String)
    /// The backend reported a failure of its own (a verbs call, a work completion status).
    case backend(call: String, node: NodeID, detail: String)

    /// The failure in a sentence naming the peer.
    public var description: String {
        switch self {
        case .unknownNode(let node):
            return "node \(node) is not a peer of this transport"
        case .unknownRegion(let node, let region, let reason):
            return "region \(region) on node \(node) is not reachable: \(reason)"
        case .outOfBounds(let node, let address, let length, let size):
            return "\(length)-byte access at \(address) on node \(node) is outside the region (\(size) bytes)"
        case .misaligned(let node, let address, let operation):
            return "\(operation) at \(address) on node \(node) needs an 8-byte aligned address"
        case .peerUnreachable(let node, let detail):
            return "node \(node) is unreachable: \(detail)"
        case .messageTooLarge(let bytes, let maximum):
            return "a message of \(bytes) bytes exceeds the channel's maximum of \(maximum) bytes"
        case .channelFull(let receiver, let waited):
            return "the channel to node \(receiver) stayed full for \(waited) ms: the receiver is not polling"
        case .corruptChannel(let sender, let receiver, let reason):
            return "the channel from node \(sender) to node \(receiver) is corrupt: \(reason)"
        case .backend(let call, let node, let detail):
            return "\(call) towards node \(node) failed: \(detail)"
        }
    }
}
