/// The identity of a node (a machine, or a process playing one) in a Granary cluster.
///
/// Node ids are small integers assigned when a node joins; they index per-node tables in the
/// transports, so they are bounded by ``NodeID/limit``.
public struct NodeID: RawRepresentable, Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    /// The id's number (below ``limit`` for a node of a cluster).
    public var rawValue: UInt16

    /// Node ids are below this bound (the transports keep flat per-node tables).
    public static let limit: Int = 64

    /// The node numbered `rawValue`, unchecked.
    @inlinable public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// The node numbered `value`; traps unless `value` is in `0..<NodeID.limit`.
    @inlinable public init(_ value: Int) {
        precondition(value >= 0 && value < NodeID.limit, "node id \(value) is outside 0..<\(NodeID.limit)")
        self.rawValue = UInt16(value)
    }

    /// The number as an index into per-node tables.
    @inlinable public var index: Int { Int(rawValue) }
    /// `n` and the number, e.g. `n2`.
    public var description: String { "n\(rawValue)" }
    /// Orders nodes by number.
    ///
    /// - Parameters:
    ///   - a: the node id compared.
    ///   - b: the id it is compared with.
    @inlinable public static func < (a: NodeID, b: NodeID) -> Bool { a.rawValue < b.rawValue }
}

/// The identity of a region: a fixed-size, replicated piece of the cluster's memory.
///
/// The same region id names every replica of a region (its primary and its backups). Ids at or above
/// ``RegionID/firstReserved`` are node-local areas (message-channel mailboxes and lease pages), never
/// replicated.
public struct RegionID: RawRepresentable, Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    /// The id's number: 1 up to (not including) ``limit`` for a data region, ``firstReserved`` or
    /// more for a node-local area (a mailbox or a lease page).
    public var rawValue: UInt32

    /// Data region ids are below this bound (the transports keep flat per-region tables).
    public static let limit: Int = 4096
    /// Ids from here on are reserved for node-local areas.
    public static let firstReserved: UInt32 = 0xFFFE_0000
    /// Lease pages are numbered from here (one per node: this or'ed with the node's number).
    @usableFromInline static let firstLeasePage: UInt32 = 0xFFFE_0000
    /// Mailboxes are numbered from here (one per node: this or'ed with the node's number).
    @usableFromInline static let firstMailbox: UInt32 = 0xFFFF_0000

    /// The region numbered `rawValue`, unchecked.
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// The region numbered `value`; traps unless `value` is in `0..<RegionID.limit`.
    @inlinable public init(_ value: Int) {
        precondition(value >= 0 && value < RegionID.limit, "region id \(value) is outside 0..<\(RegionID.limit)")
        self.rawValue = UInt32(value)
    }

    /// The mailbox of `node`: the area holding the receive rings of its message channels.
    @inlinable public static func mailbox(of node: NodeID) -> RegionID {
        RegionID(rawValue: firstMailbox | UInt32(node.rawValue))
    }

    /// The lease page of `node`: one page of volatile memory (never a file on disk) holding the
    /// words of its lease with the configuration manager.
    @inlinable public static func leasePage(of node: NodeID) -> RegionID {
        RegionID(rawValue: firstLeasePage | UInt32(node.rawValue))
    }

    /// Whether this id names a node-local mailbox rather than a data region.
    @inlinable public var isMailbox: Bool { rawValue >= RegionID.firstMailbox }

    /// The node whose lease page this is, if it is one.
    @inlinable public var leasePageOwner: NodeID? {
        rawValue >= RegionID.firstLeasePage && rawValue < RegionID.firstMailbox
            ? NodeID(rawValue: UInt16(truncatingIfNeeded: rawValue & 0xFFFF)) : nil
    }

    /// The node whose mailbox this is, if it is one.
    @inlinable public var mailboxOwner: NodeID? {
        isMailbox ? NodeID(rawValue: UInt16(truncatingIfNeeded: rawValue & 0xFFFF)) : nil
    }

    /// The number as an index into per-region tables (data regions only: a mailbox's is far
    /// beyond ``limit``).
    @inlinable public var index: Int { Int(rawValue) }

    /// `r` and the number for a data region (`r3`), `mailbox(n1)` for a mailbox, `leases(n1)` for
    /// a lease page.
    public var description: String {
        if let owner = mailboxOwner { return "mailbox(\(owner))" }
        if let owner = leasePageOwner { return "leases(\(owner))" }
        return "r\(rawValue)"
    }

    /// The region file's name inside a node's region directory. (A lease page's is a symbolic
    /// link to the memory file of the process that serves it.)
    public var fileName: String {
        if let owner = mailboxOwner { return "mailbox-\(owner).region" }
        if let owner = leasePageOwner { return "leases-\(owner).page" }
        return "r\(rawValue).region"
    }

    /// Orders regions by number (every data region before every mailbox).
    ///
    /// - Parameters:
    ///   - a: the region id compared.
    ///   - b: the id it is compared with.
    @inlinable public static func < (a: RegionID, b: RegionID) -> Bool { a.rawValue < b.rawValue }
}

/// The identity of a cluster, stamped into every region file so a node never opens another
/// cluster's memory by mistake.
public struct ClusterID: RawRepresentable, Hashable, Sendable, Codable, CustomStringConvertible {
    /// The id's 64 bits (never 0 for an id from ``random()``).
    public var rawValue: UInt64
    /// The cluster id `rawValue`.
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// A fresh random cluster id.
    public static func random() -> ClusterID {
        var generator = SystemRandomNumberGenerator()
        return ClusterID(rawValue: generator.next() | 1)
    }

    /// `cluster-` and the id in 16 hexadecimal digits.
    public var description: String {
        let hex = String(rawValue, radix: 16)
        return "cluster-" + String(repeating: "0", count: max(0, 16 - hex.count)) + hex
    }
}

/// The address of an object in the cluster's memory: a region and a byte offset inside it.
///
/// An address does not say which replica to use: the engine routes reads to the region's primary.
/// It packs into one 64-bit word (``rawValue``) so it can be stored inside objects; regions are
/// therefore at most 4 GiB.
///
/// An object's address as `Transaction.allocate` returns it also carries the incarnation of the
/// slot it was allocated in, so that a stale address, kept after the object was freed and its
/// slot reused, fails with `notAllocated` instead of reading the new object. Addresses built from
/// a region and an offset carry none (they name the slot, whatever lives there).
public struct GlobalAddress: RawRepresentable, Hashable, Sendable, Codable, CustomStringConvertible {
    /// Data regions: incarnation + 1 (bits 44..58, 0: none) | region (bits 32..43) | offset (bits
    /// 0..31). Mailboxes (region ids from ``RegionID/firstReserved``): `region << 32 | offset`.
    public var rawValue: UInt64

    /// Where the incarnation tag lies in ``rawValue``.
    @usableFromInline static let incarnationShift: UInt64 = 44
    @usableFromInline static let incarnationTagMask: UInt64 = 0x7FFF

    /// The address packed in `rawValue` (as ``rawValue`` describes).
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// The slot at `offset` bytes into `region`, with no incarnation.
    ///
    /// - Parameters:
    ///   - region: the region (a data region's id, or a mailbox's).
    ///   - offset: the byte offset in the region.
    @inlinable public init(region: RegionID, offset: UInt32) {
        self.rawValue = UInt64(region.rawValue) << 32 | UInt64(offset)
    }

    /// The address of the object allocated at `offset` in `region` with slot incarnation
    /// `incarnation` (a data region's).
    @inlinable public init(region: RegionID, offset: UInt32, incarnation: UInt16) {
        self.rawValue = UInt64(region.rawValue) << 32 | UInt64(offset)
            | (UInt64(incarnation) & 0x3FFF &+ 1) << Self.incarnationShift
    }

    /// The region the address lies in.
    @inlinable public var region: RegionID {
        let high = UInt32(truncatingIfNeeded: rawValue >> 32)
        return RegionID(rawValue: high >= RegionID.firstReserved ? high : high & 0xFFF)
    }
    /// The byte offset in the region.
    @inlinable public var offset: UInt32 { UInt32(truncatingIfNeeded: rawValue) }

    /// The slot incarnation this address was allocated with, if it carries one.
    @inlinable public var incarnation: UInt16? {
        guard UInt32(truncatingIfNeeded: rawValue >> 32) < RegionID.firstReserved else { return nil }
        let tag = (rawValue >> Self.incarnationShift) & Self.incarnationTagMask
        return tag == 0 ? nil : UInt16(truncatingIfNeeded: tag &- 1)
    }

    /// The same slot without an incarnation: what identifies the object's place.
    @inlinable public var untagged: GlobalAddress {
        guard UInt32(truncatingIfNeeded: rawValue >> 32) < RegionID.firstReserved else { return self }
        return GlobalAddress(rawValue: rawValue & ~(Self.incarnationTagMask << Self.incarnationShift))
    }

    /// This address moved `bytes` further into the same region.
    @inlinable public func advanced(by bytes: Int) -> GlobalAddress {
        GlobalAddress(region: region, offset: UInt32(Int(offset) + bytes))
    }

    /// The region, the offset in hexadecimal and the incarnation if any, e.g. `r3+0x1040#2`.
    public var description: String {
        "\(region)+0x\(String(offset, radix: 16))" + (incarnation.map { "#\($0)" } ?? "")
    }

    /// Decodes an address from its ``rawValue``, one number.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        self.rawValue = try container.decode(UInt64.self)
    }

    /// Encodes the address as its ``rawValue``, one number.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(rawValue)
    }
}
