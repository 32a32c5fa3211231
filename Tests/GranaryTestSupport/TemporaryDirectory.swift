/// Helpers shared by Granary's test targets.
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A fresh directory under $TMPDIR (or /tmp), removed with its contents by `remove()`
/// (kept when the environment sets GRANARY_KEEP_TEMPORARY).
public struct TemporaryDirectory: Sendable {
    public let path: FilePath

    public init(_ label: String = "granary-test") {
        let base = ProcessInfoLite.environment("TMPDIR") ?? "/tmp"
        var template = Array("\(base)/\(label)-XXXXXX".utf8CString)
        let result = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(result != nil, "mkdtemp failed in \(base)")
        path = FilePath(String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
    }

    /// Takes charge of `path`, a directory the caller made.
    public init(existing path: FilePath) {
        self.path = path
    }

    /// Removes the directory, unless GRANARY_KEEP_TEMPORARY is set (to read a failed test's
    /// node logs and region files afterwards).
    public func remove() {
        if ProcessInfoLite.environment("GRANARY_KEEP_TEMPORARY") != nil { return }
        _ = path.withPlatformString { p in
            system("rm -rf '\(String(cString: p))'")
        }
    }
}

public enum ProcessInfoLite {
    public static func environment(_ name: String) -> String? {
        guard let value = getenv(name) else { return nil }
        return String(cString: value)
    }
}
