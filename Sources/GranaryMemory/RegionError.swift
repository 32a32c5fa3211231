import SystemPackage

/// Why a region could not be created, opened, persisted or addressed.
///
/// Every case names the file (or region) and says what is wrong; none of them is ever "repaired" by
/// re-initialising the file: a region that fails to open is left exactly as it was found.
public enum RegionError: Error, Sendable, Equatable, CustomStringConvertible {
    /// There is no file where the region should be.
    case missing(path: FilePath)
    /// `create` found a file already there (Granary never overwrites a region).
    case alreadyExists(path: FilePath)
    /// The file is shorter than its header, or than the size its header records.
    case truncated(path: FilePath, actualBytes: Int, expectedBytes: Int)
    /// The file does not start with Granary's magic number.
    case foreign(path: FilePath, magic: UInt64)
    /// The file was written by a format version this build does not read.
    case unsupportedFormat(path: FilePath, version: UInt32)
    /// The header's checksum or fields are inconsistent.
    case corrupt(path: FilePath, reason: String)
    /// The file holds a different region than the one asked for.
    case wrongRegion(path: FilePath, found: RegionID, expected: RegionID)
    /// The file belongs to another cluster.
    case wrongCluster(path: FilePath, found: ClusterID, expected: ClusterID)
    /// A requested region size is unusable.
    case invalidSize(bytes: Int, reason: String)
    /// libpmem or the kernel refused a call.
    case systemCall(call: String, path: FilePath, message: String)
    /// An access falls outside the region.
    case outOfBounds(region: RegionID, offset: Int, length: Int, size: Int)

    /// The error in a sentence naming the file or region.
    public var description: String {
        switch self {
        case .missing(let path):
            return "region file \(path) does not exist"
        case .alreadyExists(let path):
            return "region file \(path) already exists; Granary never overwrites a region (remove it by hand if it is garbage)"
        case .truncated(let path, let actual, let expected):
            return "region file \(path) is \(actual) bytes, expected \(expected): the file is truncated or not a Granary region"
        case .foreign(let path, let magic):
            return "region file \(path) is not a Granary region (magic 0x\(String(magic, radix: 16)), expected 0x\(String(RegionFormat.magic, radix: 16)))"
        case .unsupportedFormat(let path, let version):
            return "region file \(path) has format version \(version); this build reads version \(RegionFormat.version)"
        case .corrupt(let path, let reason):
            return "region file \(path) is corrupt: \(reason)"
        case .wrongRegion(let path, let found, let expected):
            return "region file \(path) holds region \(found), expected \(expected)"
        case .wrongCluster(let path, let found, let expected):
            return "region file \(path) belongs to \(found), not to \(expected)"
        case .invalidSize(let bytes, let reason):
            return "region size \(bytes) bytes is invalid: \(reason)"
        case .systemCall(let call, let path, let message):
            return "\(call) failed for region file \(path): \(message)"
        case .outOfBounds(let region, let offset, let length, let size):
            return "access of \(length) bytes at offset \(offset) is outside region \(region) of \(size) bytes"
        }
    }
}
