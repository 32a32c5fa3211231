import Foundation
import Testing
import GranaryTestSupport
import SystemPackage
@testable import GranaryMemory
#if canImport(Glibc)
import Glibc
#endif

private func fileBytes(_ path: FilePath) -> [UInt8] {
    guard let file = path.withPlatformString({ fopen($0, "rb") }) else { return [] }
    defer { fclose(file) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = fread(&buffer, 1, buffer.count, file)
        if n == 0 { break }
        bytes += buffer[0..<n]
    }
    return bytes
}

private func writeFile(_ path: FilePath, _ bytes: [UInt8]) {
    let file = path.withPlatformString { fopen($0, "wb") }!
    _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) }
    fclose(file)
}

@Suite("Persistent regions")
struct RegionTests {
    let cluster = ClusterID(rawValue: 0xC0FFEE)

    @Test("a created region reopens with its header and the bytes written before persist")
    func createPersistReopen() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let dir = try RegionDirectory(tmp.path.appending("n0"))
        do {
            let region = try dir.create(RegionID(7), size: 1 << 20, cluster: cluster)
            #expect(region.size == 1 << 20)
            (region.base + 8192).storeBytes(of: 0xFEED_FACE, as: UInt64.self)
            try region.persist(offset: 8192, length: 8)
        }
        let reopened = try dir.open(RegionID(7), cluster: cluster)
        #expect(reopened.id == RegionID(7))
        #expect(reopened.cluster == cluster)
        #expect(reopened.kind == .data)
        #expect((reopened.base + 8192).load(as: UInt64.self) == 0xFEED_FACE)
        #expect(dir.regionIDs() == [RegionID(7)])
    }

    @Test("sizes that are not a power of two, or out of bounds, are refused")
    func invalidSizes() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let dir = try RegionDirectory(tmp.path)
        #expect(throws: RegionError.self) { try dir.create(RegionID(1), size: 3 << 20, cluster: cluster) }
        #expect(throws: RegionError.self) { try dir.create(RegionID(1), size: 4096, cluster: cluster) }
        #expect(dir.regionIDs().isEmpty, "a refused create leaves no file")
    }

    @Test("create never overwrites an existing file")
    func createRefusesExisting() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let dir = try RegionDirectory(tmp.path)
        _ = try dir.create(RegionID(1), size: 1 << 20, cluster: cluster)
        let before = fileBytes(dir.path(for: RegionID(1)))
        #expect(throws: RegionError.alreadyExists(path: dir.path(for: RegionID(1)))) {
            try dir.create(RegionID(1), size: 1 << 20, cluster: cluster)
        }
        #expect(fileBytes(dir.path(for: RegionID(1))) == before)
    }

    /// A process killed while it creates a region leaves its file under a name of its own, never
    /// a file without a header at the region's name (which every later open would refuse and no
    /// creation could replace); the next creation of the region removes what a dead process left.
    @Test("a creation cut short leaves no file at the region's name, and the next one cleans up after it")
    func creationCutShort() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let dir = try RegionDirectory(tmp.path)
        let name = dir.path(for: RegionID(4)).string
        // The pid of a process that has exited, and our own (a creation under way in this process).
        var child: pid_t = 0
        var arguments: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/true"), nil]
        defer { free(arguments[0]) }
        #expect(posix_spawn(&child, "/bin/true", nil, nil, &arguments, nil) == 0)
        var status: Int32 = 0
        _ = waitpid(child, &status, 0)
        let dead = FilePath(name + ".creating.\(child).7")
        let underWay = FilePath(name + ".creating.\(getpid()).8")
        writeFile(dead, [UInt8](repeating: 0, count: 4096))
        writeFile(underWay, [UInt8](repeating: 0, count: 4096))
        #expect(dir.regionIDs().isEmpty, "a file under creation is not a region: \(dir.regionIDs())")
        #expect(throws: RegionError.missing(path: dir.path(for: RegionID(4)))) { try dir.open(RegionID(4)) }

        _ = try dir.create(RegionID(4), size: 1 << 20, cluster: cluster)
        #expect(access(dead.string, F_OK) != 0, "the dead process's \(dead) was left")
        #expect(access(underWay.string, F_OK) == 0, "a live process's \(underWay) was removed")
        #expect(dir.regionIDs() == [RegionID(4)])
        let reopened = try dir.open(RegionID(4), cluster: cluster)
        #expect(reopened.id == RegionID(4))
        let leftovers = (try? FileManager.default.contentsOfDirectory(atPath: tmp.path.string))?.filter { $0.contains(".creating.") && !$0.contains(".\(getpid()).") }
        #expect(leftovers == [], "creation left \(leftovers ?? [])")
    }

    /// Every bad file gives an error naming the file, and the file is left exactly as it was.
    @Test("missing, short, foreign, corrupt and misplaced region files are named and left untouched")
    func badFiles() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let dir = try RegionDirectory(tmp.path)
        let path = dir.path(for: RegionID(3))

        #expect(throws: RegionError.missing(path: path)) { try dir.open(RegionID(3)) }

        func expectUntouched(_ expected: (RegionError) -> Bool, _ open: () throws -> Region) {
            let before = fileBytes(path)
            do {
                _ = try open()
                Issue.record("opening \(path) should have failed")
            } catch let error as RegionError {
                #expect(expected(error), "unexpected error: \(error)")
                #expect(error.description.contains(path.string), "error does not name the file: \(error)")
            } catch {
                Issue.record("unexpected error type: \(error)")
            }
            #expect(fileBytes(path) == before, "a failed open modified \(path)")
        }

        writeFile(path, [UInt8](repeating: 7, count: 100))
        expectUntouched({ if case .truncated = $0 { true } else { false } }) { try dir.open(RegionID(3)) }

        writeFile(path, [UInt8](repeating: 0x41, count: 8192))
        expectUntouched({ if case .foreign = $0 { true } else { false } }) { try dir.open(RegionID(3)) }

        // A real region with one header byte flipped.
        unlink(path.string)
        _ = try dir.create(RegionID(3), size: 1 << 20, cluster: cluster)
        var bytes = fileBytes(path)
        bytes[17] ^= 0x01
        writeFile(path, bytes)
        expectUntouched({ if case .corrupt = $0 { true } else { false } }) { try dir.open(RegionID(3)) }

        // A real region cut short.
        bytes[17] ^= 0x01
        writeFile(path, Array(bytes[0..<(1 << 19)]))
        expectUntouched({ if case .truncated = $0 { true } else { false } }) { try dir.open(RegionID(3)) }

        // A whole, valid region of another cluster, and one renamed to another region's file.
        writeFile(path, bytes)
        expectUntouched({ if case .wrongCluster = $0 { true } else { false } }) {
            try dir.open(RegionID(3), cluster: ClusterID(rawValue: 42))
        }
        rename(path.string, dir.path(for: RegionID(4)).string)
        let moved = dir.path(for: RegionID(4))
        #expect(throws: RegionError.wrongRegion(path: moved, found: RegionID(3), expected: RegionID(4))) {
            try dir.open(RegionID(4))
        }
        // And the good file still opens.
        rename(moved.string, path.string)
        #expect(try dir.open(RegionID(3), cluster: cluster).id == RegionID(3))
    }

    /// Lease words must never wait on a file system (on ext4, a store to a file page after
    /// writeback waits on the journal): the lease page is a memory file, reached through a link.
    @Test("a lease page is memory no file system backs: its link opens it while it lives, stores show through both mappings, a new page replaces the link, and a gone page's link opens nothing")
    func leasePage() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let dir = try RegionDirectory(tmp.path.appending("n3"))
        let node = NodeID(rawValue: 3)
        var page: Region? = try dir.createLeasePage(of: node, cluster: cluster)
        let link = dir.path(for: .leasePage(of: node))
        #expect(link.string.hasSuffix("leases-n3.page"))
        // The link names this process's descriptor, which names a memory file (not the directory's file system).
        let targetPath = Region.linkTarget(link) ?? ""
        #expect(targetPath == "/proc/\(getpid())/fd/\(page!.descriptor)", "link points at \(targetPath)")
        let memory = Region.linkTarget(FilePath(targetPath)) ?? ""
        #expect(memory.hasPrefix("/memfd:granary-leases(n3)"), "the descriptor names '\(memory)', not a memory file")
        #expect(page!.kind == .leasePage && page!.size == RegionFormat.headerBytes)

        // A peer's view: opened through the link, checked like a region file.
        let peer = try Region.open(at: link, expecting: .leasePage(of: node), cluster: cluster)
        #expect(peer.kind == .leasePage && peer.id == .leasePage(of: node))
        (page!.base + 64).storeBytes(of: UInt64(41), as: UInt64.self)
        #expect((peer.base + 64).load(as: UInt64.self) == 41)
        (peer.base + 72).storeBytes(of: UInt64(42), as: UInt64.self)
        #expect((page!.base + 72).load(as: UInt64.self) == 42)
        #expect(throws: RegionError.self) { try Region.open(at: link, expecting: .mailbox(of: node), cluster: cluster) }

        // A later process (here: a second page) replaces the link; the first page stays mapped.
        var second: Region? = try dir.createLeasePage(of: node, cluster: cluster)
        (second!.base + 64).storeBytes(of: UInt64(7), as: UInt64.self)
        let reopened = try Region.open(at: link, expecting: .leasePage(of: node), cluster: cluster)
        #expect((reopened.base + 64).load(as: UInt64.self) == 7, "the link still opens the first page")
        #expect((peer.base + 64).load(as: UInt64.self) == 41)

        // The first page going leaves the second's link; once the page that the link names is
        // gone, the link is too (a page whose process was killed leaves a link that opens
        // nothing); the mappings peers hold stay readable.
        page = nil
        #expect(Region.linkTarget(link) == "/proc/\(getpid())/fd/\(second!.descriptor)")
        second = nil
        #expect(throws: RegionError.missing(path: link)) { try Region.open(at: link, expecting: .leasePage(of: node), cluster: cluster) }
        #expect(Region.linkTarget(link) == nil, "the link stayed")
        #expect((reopened.base + 64).load(as: UInt64.self) == 7)
    }

    /// New backups made during recovery skip the reservation (on tmpfs it zeroes every page)
    /// and reserve their space afterwards, in chunks.
    @Test("a region created sparse holds almost no blocks; reserveSpace in chunks reserves its whole length and keeps what was written")
    func sparseThenReserved() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let dir = try RegionDirectory(tmp.path.appending("n0"))
        func allocatedBytes(_ path: FilePath) -> Int {
            var info = stat()
            _ = path.withPlatformString { stat($0, &info) }
            return Int(info.st_blocks) * 512
        }
        let region = try dir.create(RegionID(3), size: 4 << 20, cluster: cluster, sparse: true)
        #expect(allocatedBytes(region.path) < 1 << 20, "a sparse 4 MiB region already holds \(allocatedBytes(region.path)) bytes")
        (region.base + (3 << 20)).storeBytes(of: UInt64(0xFEED), as: UInt64.self)
        try region.reserveSpace(chunk: 256 << 10, pausing: .zero)
        #expect(allocatedBytes(region.path) >= 4 << 20, "reserved \(allocatedBytes(region.path)) of \(4 << 20) bytes")
        #expect((region.base + (3 << 20)).load(as: UInt64.self) == 0xFEED)
        let reopened = try dir.open(RegionID(3), cluster: cluster)
        #expect(reopened.size == 4 << 20 && reopened.id == RegionID(3))
    }
}
